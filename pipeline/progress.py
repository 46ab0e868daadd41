"""Progress bars that vanish on non-main processes and in CI logs."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0):
    if not enabled or os.environ.get("CI") or not sys.stderr.isatty():
        return _Silent()
    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True)
