"""The ``distill`` command's first module: stop signals are caught before anything else is imported.

A scheduler's SIGUSR1 or a SIGTERM can arrive while the interpreter is still importing the command
line, argparse and the config (the first ~0.65 s); the default action of both ends the process with
no checkpoint and no PREEMPTED marker. The handler installed here only records a signal (it imports
nothing but ``signal``): ``distill run`` keeps it and acts on what was recorded when its setup
begins; every other command puts the default actions back and receives what was recorded
(:meth:`distill.signals.StopSignals.hand_back`).
"""

from distill.signals import SIGNALS


def main() -> int:
    SIGNALS.install()
    from distill_launcher.cli import main as cli_main  # start-up time: distill_launcher.cli loads torch; only this command needs it

    return cli_main()
