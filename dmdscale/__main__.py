"""python -m dmdscale --config FILE [--quick] [--out DIR] [key=value ...]: a run of any family."""
from dmdscale import cli
from dmdscale.driver import run

if __name__ == "__main__":
    cli.main(run, None, None, __doc__)
