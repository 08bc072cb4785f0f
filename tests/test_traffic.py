"""mpiml.traffic: bytes sent for training, without what measuring (evaluation, drift) sends."""

import threading

from mpiml import traffic


def test_uncounted_blocks_only_this_thread():
    start = traffic.sent()
    traffic.add(100)
    with traffic.uncounted():
        traffic.add(1000)
        other = threading.Thread(target=traffic.add, args=(10,))
        other.start()
        other.join()
        with traffic.uncounted():
            traffic.add(1)
        traffic.add(1)
    traffic.add(5)
    assert traffic.sent() - start == 100 + 10 + 5
