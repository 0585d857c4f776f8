"""Shared helpers for the inference tests: tiny chest phantoms written with write_ct_series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pe_triage_node.synth.ct_series import write_ct_series


def chest_phantom(nz: int = 30, n: int = 48, *, lung_z: tuple[int, int] | None = (4, 26)) -> np.ndarray:
    """(z, y, x) HU: air outside, soft-tissue body ellipse, two lungs (-850 HU) in slices lung_z."""
    z, y, x = np.mgrid[:nz, :n, :n]
    vol = np.full((nz, n, n), -1000.0, dtype=np.float32)
    c = n / 2
    body = ((y - c) / (0.42 * n)) ** 2 + ((x - c) / (0.47 * n)) ** 2 < 1
    vol[body] = 40.0
    if lung_z is not None:
        for side in (-1, 1):
            lung = ((y - c) / (0.3 * n)) ** 2 + ((x - c - side * 0.22 * n) / (0.15 * n)) ** 2 < 1
            vol[lung & (z >= lung_z[0]) & (z < lung_z[1])] = -850.0
    return vol


@pytest.fixture(scope="session")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 slices, 48 x 48 at 2 mm pixels, 2 mm slice spacing (lungs 8-52 mm)."""
    d = tmp_path_factory.mktemp("small_series")
    write_ct_series(chest_phantom(), d, pixel_spacing=(2.0, 2.0), slice_spacing=2.0)
    return d


@pytest.fixture(scope="session")
def phantom():  # type: ignore[no-untyped-def]
    """The :func:`chest_phantom` function, for tests that build their own volumes."""
    return chest_phantom
