"""Write the digits of ``examples/digits.py`` as Parquet files for ``job.yaml``.

Run: ``.venv/bin/python examples/digits_job/prepare.py`` (writes ``train.parquet`` and
``test.parquet`` beside this file: 64 pixel columns ``p0``…``p63`` and ``digit``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from digits import load_data  # noqa: E402  (the same split as the demo)


def main() -> None:
    x_train, x_test, y_train, y_test = load_data()
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        frame = pd.DataFrame(x, columns=[f"p{i}" for i in range(x.shape[1])])
        frame["digit"] = y
        frame.to_parquet(HERE / f"{name}.parquet")
        print(f"wrote {HERE / f'{name}.parquet'} ({len(frame)} rows)")


if __name__ == "__main__":
    main()
