"""A typical Horovod PyTorch training script, on scikit-learn's bundled 8x8 digits instead of MNIST.

It is shaped like Horovod's examples/pytorch/pytorch_mnist.py (argument
names, DistributedSampler, lr scaled by the number of ranks, broadcast of
parameters and optimizer state, DistributedOptimizer with optional fp16
compression, metrics averaged with hvd.allreduce). The only change from a
Horovod script is the import line marked below. The defaults differ from
that example's only where 1,440 training images need it: lr 0.05 and
momentum 0.9 (about 93% test accuracy after 10 epochs at 2 ranks).

    .venv/bin/mpiexec -n 2 .venv/bin/python scripts/examples/horovod_mnist_style.py
    .venv/bin/python -m mpiml.run -np 4 scripts/examples/horovod_mnist_style.py --epochs 5 --fp16-allreduce
"""

import argparse

import torch
import torch.nn.functional as F
import torch.utils.data.distributed
from sklearn.datasets import load_digits
from torch import nn, optim

import mpiml.torch as hvd  # the one changed line: was `import horovod.torch as hvd`

parser = argparse.ArgumentParser(description="PyTorch digits example (Horovod style)")
parser.add_argument("--batch-size", type=int, default=64, help="input batch size for training (per rank)")
parser.add_argument("--test-batch-size", type=int, default=256, help="input batch size for testing")
parser.add_argument("--epochs", type=int, default=10, help="number of epochs to train")
parser.add_argument("--lr", type=float, default=0.05, help="learning rate (scaled by the number of ranks)")
parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
parser.add_argument("--seed", type=int, default=42, help="random seed")
parser.add_argument("--log-interval", type=int, default=10, help="batches between training status lines")
parser.add_argument("--fp16-allreduce", action="store_true", default=False, help="use fp16 compression")
parser.add_argument("--use-adasum", action="store_true", default=False, help="use Adasum (Horovod only)")
parser.add_argument("--gradient-predivide-factor", type=float, default=1.0,
                    help="apply gradient predivide factor in optimizer")


class Net(nn.Module):
    """A small convolutional network for 1x8x8 images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


def datasets():
    """The digits as (train, test) TensorDatasets: the same fixed split on every rank."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1440], order[1440:]
    return (torch.utils.data.TensorDataset(x[train], y[train]),
            torch.utils.data.TensorDataset(x[test], y[test]))


def loaders(args):
    train_dataset, test_dataset = datasets()
    # Horovod: use DistributedSampler to partition the data among ranks.
    train_sampler = torch.utils.data.distributed.DistributedSampler(
        train_dataset, num_replicas=hvd.size(), rank=hvd.rank())
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size, sampler=train_sampler)
    test_sampler = torch.utils.data.distributed.DistributedSampler(
        test_dataset, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=False)
    test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=args.test_batch_size, sampler=test_sampler)
    return train_loader, train_sampler, test_loader, test_sampler


def model_and_optimizer(args):
    model = Net()
    # Horovod: scale the learning rate by the number of ranks (Adasum needs no scaling).
    lr_scaler = hvd.size() if not args.use_adasum else 1
    optimizer = optim.SGD(model.parameters(), lr=args.lr * lr_scaler, momentum=args.momentum)
    # Horovod: start every rank from rank 0's parameters and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    # Horovod: (optional) compression algorithm.
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    # Horovod: wrap the optimizer with DistributedOptimizer.
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression,
                                         op=hvd.Adasum if args.use_adasum else hvd.Average,
                                         gradient_predivide_factor=args.gradient_predivide_factor)
    return model, optimizer


def train(model, optimizer, train_loader, train_sampler, epoch, args):
    model.train()
    # Horovod: set the epoch on the sampler so each epoch's shuffle differs.
    train_sampler.set_epoch(epoch)
    for batch_idx, (data, target) in enumerate(train_loader):
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        if batch_idx % args.log_interval == 0 and hvd.rank() == 0:
            # Horovod: use train_sampler to determine the number of examples in this rank's partition.
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_sampler)} "
                  f"({100.0 * batch_idx / len(train_loader):.0f}%)]\tLoss: {loss.item():.6f}")


def metric_average(val, name):
    tensor = torch.tensor(val)
    avg_tensor = hvd.allreduce(tensor, name=name)
    return avg_tensor.item()


def test(model, test_loader, test_sampler):
    model.eval()
    test_loss, test_accuracy = 0.0, 0.0
    with torch.no_grad():
        for data, target in test_loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            test_accuracy += output.argmax(dim=1).eq(target).float().sum().item()
    # Horovod: use test_sampler to determine the number of examples in this rank's partition.
    test_loss /= len(test_sampler)
    test_accuracy /= len(test_sampler)
    # Horovod: average metric values across ranks.
    test_loss = metric_average(test_loss, "avg_loss")
    test_accuracy = metric_average(test_accuracy, "avg_accuracy")
    if hvd.rank() == 0:
        print(f"\nTest set: Average loss: {test_loss:.4f}, Accuracy: {100.0 * test_accuracy:.2f}%\n")
    return test_accuracy


def main(args):
    # Horovod: initialize library.
    hvd.init()
    torch.manual_seed(args.seed)
    # Horovod: limit the number of CPU threads to be used per rank.
    torch.set_num_threads(1)
    train_loader, train_sampler, test_loader, test_sampler = loaders(args)
    model, optimizer = model_and_optimizer(args)
    accuracy = 0.0
    for epoch in range(1, args.epochs + 1):
        train(model, optimizer, train_loader, train_sampler, epoch, args)
        accuracy = test(model, test_loader, test_sampler)
    return model, accuracy


if __name__ == "__main__":
    main(parser.parse_args())
