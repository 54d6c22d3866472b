"""Write the example's synthetic cardiology exports: st-mary/cardio.csv, riverside/cardio.csv.

Made-up patients, no real data: age, sex, resting blood pressure,
cholesterol, maximum heart rate, and a diagnosis drawn from a logistic model
of them, so that a model has something to learn. The hospitals differ in
size and in their patients (Riverside's are older); about 2% of the blood
pressures are missing ("?"). The CSVs are committed; with its fixed seed
this script writes them again, byte for byte:

    python docs/examples/make_data.py            # into docs/examples/
    python docs/examples/make_data.py /tmp/out   # elsewhere
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

SEED = 2024
HEADER = ["patient_id", "age", "sex", "resting_bp", "cholesterol", "max_heart_rate", "diagnosis"]
# site folder: (patients, mean age, patient id prefix)
SITES = {"st-mary": (320, 55.0, "SM"), "riverside": (280, 63.0, "RV")}


def site_rows(
    rng: np.random.Generator, count: int, mean_age: float, prefix: str
) -> list[list[str]]:
    """One hospital's export, one row per patient."""
    age = np.clip(rng.normal(mean_age, 9.0, count).round(), 18, 95).astype(int)
    male = rng.random(count) < 0.5
    resting_bp = np.clip(rng.normal(120.0 + 0.4 * (age - 55), 15.0), 80.0, 220.0)
    cholesterol = np.clip(rng.normal(220.0, 40.0, count), 120.0, 450.0)
    max_heart_rate = np.clip(rng.normal(210.0 - 0.8 * age, 15.0), 80.0, 210.0).round()
    logit = (
        0.06 * (age - 58)
        + 0.9 * male
        + 0.03 * (resting_bp - 125.0)
        + 0.01 * (cholesterol - 220.0)
        - 0.03 * (max_heart_rate - 160.0)
        - 0.3
    )
    diagnosis = rng.random(count) < 1.0 / (1.0 + np.exp(-logit))
    bp_missing = rng.random(count) < 0.02
    return [
        [
            f"{prefix}-{index + 1:04d}",
            str(age[index]),
            "male" if male[index] else "female",
            "?" if bp_missing[index] else f"{resting_bp[index]:.1f}",
            f"{cholesterol[index]:.1f}",
            str(int(max_heart_rate[index])),
            str(int(diagnosis[index])),
        ]
        for index in range(count)
    ]


def write_exports(folder: Path) -> list[Path]:
    """Write `<site>/cardio.csv` for every site under `folder`; returns the files."""
    rng = np.random.default_rng(SEED)
    written = []
    for site, (count, mean_age, prefix) in SITES.items():
        path = folder / site / "cardio.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(HEADER)
            writer.writerows(site_rows(rng, count, mean_age, prefix))
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    for written in write_exports(target):
        print(written)
