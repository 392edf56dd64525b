"""``info``: versions, the device, the decoding modes and the backend each op uses."""

NAME = "info"
ORDER = 70
HELP = "versions, device and the backend each op uses"


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    from mage_fast.info import report
    print(report())
    return 0
