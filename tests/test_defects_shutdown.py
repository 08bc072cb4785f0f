"""A bad-input error (UserError) raised on one rank alone must not leave the others waiting (issue 11, #2).

One job under the MPI of the interpreter's environment; the general mechanism for unexpected exceptions is
tested in tests/test_failures.py, under both MPIs.
"""

import sys
import textwrap

from failure_cases import mpiexec, run_from


def test_a_user_error_on_one_rank_alone_ends_the_job_with_its_message(tmp_path):
    script = tmp_path / "alone.py"
    script.write_text(textwrap.dedent("""
        import sys, numpy as np, mpiml
        from mpiml import collectives
        from mpiml.runtime import UserError, abort_on_exception
        mpiml.init(stall_warning=0, timeout=120)
        def main():
            for step in range(1000000):
                if mpiml.rank() == 1 and step == 10:
                    print("rank 1 fails now", flush=True)
                    raise UserError("--thing: rank 1 cannot read it")
                collectives.allreduce(np.ones(4), name=f"step {step}")
        sys.exit(abort_on_exception(main, prog="alone"))
    """))
    code, _, err, after = run_from(mpiexec(3) + [sys.executable, str(script)], "rank 1 fails now",
                                   timeout=240)
    assert code != 0
    assert "alone: error on rank 1: --thing: rank 1 cannot read it" in err, err[-3000:]
    assert "the other ranks did not end with this error" in err
    assert after < 10 + 10, after
