"""A plain PyTorch training script made data-parallel with mpiml: the added lines end in ``# mpiml``.

    .venv/bin/mpiexec -n 2 .venv/bin/python scripts/examples/plain_torch_with_mpiml.py

Without the marked lines this is an ordinary single-process script. With
them, every rank trains on its own slice of the data, gradients are averaged
through the ring allreduce before each step, and all ranks end with the same
model.
"""

import torch
from sklearn.datasets import load_digits

import mpiml  # mpiml

mpiml.init(threads=1)  # mpiml
torch.manual_seed(0)

x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
usable = len(y) // mpiml.size() * mpiml.size()  # mpiml: equal slices, so every rank runs the same steps
x, y = x[mpiml.rank():usable:mpiml.size()], y[mpiml.rank():usable:mpiml.size()]  # mpiml: this rank's slice
train_x, train_y, test_x, test_y = x[:-60], y[:-60], x[-60:], y[-60:]

model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
optimizer = mpiml.DistributedOptimizer(optimizer, model, topology="ring")  # mpiml
mpiml.broadcast_parameters(model, root=0)  # mpiml: every replica starts from rank 0's weights
mpiml.broadcast_optimizer_state(optimizer, root=0)  # mpiml

for _epoch in range(15):
    order = torch.randperm(len(train_y))
    for i in range(0, len(order) - 31, 32):
        batch = order[i:i + 32]
        loss = torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

with torch.no_grad():
    correct = (model(test_x).argmax(1) == test_y).sum()
correct = mpiml.collectives.allreduce(correct.reshape(1), op="sum")  # mpiml: count over every rank's test slice
if mpiml.rank() == 0:  # mpiml
    print(f"test accuracy {correct.item() / (60 * mpiml.size()):.3f} "
          f"({mpiml.size()} ranks, params sha256 {mpiml.parameters_sha256(model.parameters())[:16]})")
