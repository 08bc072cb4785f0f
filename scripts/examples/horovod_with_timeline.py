"""The Horovod-style digits example with the timeline on: a Chrome trace of what every rank did, and when.

    .venv/bin/mpiexec -n 2 .venv/bin/python scripts/examples/horovod_with_timeline.py
    .venv/bin/python -m mpiml.run -np 2 --timeline-filename out/t.json scripts/examples/horovod_mnist_style.py

Horovod turns its timeline on with ``HOROVOD_TIMELINE=path`` (or
``horovodrun --timeline-filename``, or ``hvd.start_timeline``); so does
mpiml.torch, which is all this script does before running
``horovod_mnist_style.py``'s training, plus three lines of mpiml extension
(``hvd.timeline()``) that put the script's own forward, backward and step
phases into the same trace, next to the engine's negotiation, waiting and
fused allreduces. At exit every rank's events are merged into the one file
(one process row per rank). Open it in https://ui.perfetto.dev or
chrome://tracing.
"""

import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import horovod_mnist_style as example  # noqa: E402 - the script next to this one

import mpiml.torch as hvd  # noqa: E402

example.parser.add_argument("--timeline", default="out/horovod_timeline.json", help="where to write the trace")


def record_phases(model, optimizer):
    """Spans for forward, backward and step on the calling thread's row (hooks, so the loop is untouched)."""
    timeline = hvd.timeline()
    model.register_forward_pre_hook(lambda module, inputs: timeline.begin("forward", "compute"))
    model.register_forward_hook(lambda module, inputs, output: timeline.end("forward", "compute"))
    model.register_full_backward_pre_hook(lambda module, grad: timeline.begin("backward", "compute"))
    model.register_full_backward_hook(lambda module, grad_in, grad_out: timeline.end("backward", "compute"))
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: timeline.begin("step (wait + update)", "compute"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: timeline.end("step (wait + update)", "compute"))


def summary(path):
    with open(path) as f:
        events = json.load(f)
    counts = collections.Counter(e["name"] for e in events if e.get("ph") in ("X", "B"))
    ranks = sorted({e["pid"] for e in events})
    fused = [e["args"]["tensors"] for e in events if e["name"] == "ALLREDUCE" and "tensors" in e.get("args", {})]
    print(f"timeline: {path} ({len(events)} events from ranks {ranks})")
    print(f"  {counts['ALLREDUCE']} allreduce phases; engine allreduces fused {sum(fused)} tensors into "
          f"{len(fused)} collectives; {counts['NEGOTIATE']} negotiation cycles with work; "
          f"{counts['forward']} forward, {counts['backward']} backward, {counts['WAIT']} waits")


def main():
    args = example.parser.parse_args()
    path = os.path.abspath(args.timeline)
    os.environ["HOROVOD_TIMELINE"] = path  # read by hvd.init() inside example.main
    os.environ.setdefault("HOROVOD_TIMELINE_MARK_CYCLES", "1")
    build = example.model_and_optimizer

    def build_and_record(a):
        model, optimizer = build(a)
        record_phases(model, optimizer)
        return model, optimizer
    example.model_and_optimizer = build_and_record
    example.main(args)
    rank = hvd.rank()
    hvd.shutdown()  # every rank's events are merged into `path` on rank 0
    if rank == 0:
        summary(path)


if __name__ == "__main__":
    main()
