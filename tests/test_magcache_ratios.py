"""Ratio tables: the bundled ones, calibrated files, and upstream's nearest interpolation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from magcache.ratios import (
    BUNDLED_KEYS,
    RatioTableError,
    bundled_table,
    load_ratio_file,
    mag_ratios,
    nearest_interp,
    table_key,
)


def upstream_mag(ratios, steps):
    """Upstream: np.array([1.0]*2 + ratios), per-branch np.round-indexed nearest interpolation."""
    mag = np.array([1.0] * 2 + list(ratios))
    if len(mag) == 2 * steps:
        return mag.tolist()

    def interp(src, n):
        if n == 1:
            return np.array([src[-1]])
        return src[np.round(np.arange(n) * ((len(src) - 1) / (n - 1))).astype(int)]

    con, ucon = interp(mag[0::2], steps), interp(mag[1::2], steps)
    return np.concatenate([con.reshape(-1, 1), ucon.reshape(-1, 1)], axis=1).reshape(-1).tolist()


def test_bundled_tables_are_the_published_ones():
    data = Path(__file__).parents[1] / "magcache" / "data" / "magcache_ratios.json"
    shared = json.loads(data.read_text(encoding="utf-8"))
    for key in BUNDLED_KEYS:
        table = bundled_table(key)
        assert table.ratios == tuple(shared[key]["ratios"])
        assert len(table.ratios) == 2 * (table.sample_steps - 1)
        assert table.source == "bundled"
    assert (bundled_table("t2v-A14B").sample_steps, bundled_table("ti2v-5B/i2v").sample_steps) == (40, 50)


def test_table_key():
    assert table_key("t2v-A14B") == "t2v-A14B"
    assert table_key("ti2v-5B") == "ti2v-5B/t2v"
    assert table_key("ti2v-5B", with_image=True) == "ti2v-5B/i2v"
    with pytest.raises(RatioTableError, match="no bundled MagCache ratios for task 't2v-1.3B'"):
        table_key("t2v-1.3B")
    with pytest.raises(RatioTableError, match="use one of"):
        bundled_table("ti2v-5B")


@pytest.mark.parametrize("key", BUNDLED_KEYS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10, 13, 20, 25, 30, 39, 40, 41, 49, 50, 51, 60, 77, 100, 150])
def test_interpolation_equals_upstream(key, steps):
    ratios = bundled_table(key).ratios
    assert mag_ratios(ratios, steps) == upstream_mag(ratios, steps)


def test_interpolation_rounds_half_to_even():
    # 3 -> 5 points: scale 0.5, i*scale = 0, .5, 1, 1.5, 2 -> indices 0, 0, 1, 2, 2 (half to even)
    assert nearest_interp([10.0, 11.0, 12.0], 5) == [10.0, 10.0, 11.0, 12.0, 12.0]
    assert nearest_interp([10.0, 11.0, 12.0], 1) == [12.0]
    with pytest.raises(RatioTableError, match="at least 1 step"):
        nearest_interp([1.0], 0)


def test_mag_starts_with_two_ones_and_keeps_branches_apart():
    ratios = [0.9, 0.8] * 39
    mag = mag_ratios(ratios, 20)
    assert mag[:2] == [1.0, 1.0] and len(mag) == 40
    assert set(mag[2::2]) == {0.9} and set(mag[3::2]) == {0.8}
    with pytest.raises(RatioTableError, match="even count"):
        mag_ratios([0.9, 0.8, 0.7], 20)


def _write(tmp_path, data, name="ratios.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


GOOD = {"task": "t2v-A14B", "sample_steps": 3, "sample_shift": 12.0, "ratios": [0.99, 0.98, 0.97, 0.96],
        "stds": [0.01, 0.02, 0.03, 0.04], "cos_dists": [0.1, 0.2, 0.3, 0.4]}


def test_load_calibrated_file(tmp_path):
    table = load_ratio_file(_write(tmp_path, GOOD), task="t2v-A14B")
    assert table.ratios == (0.99, 0.98, 0.97, 0.96) and table.stds == (0.01, 0.02, 0.03, 0.04)
    assert table.sample_steps == 3 and table.source.endswith("ratios.json")
    assert table.mag(3) == [1.0, 1.0, 0.99, 0.98, 0.97, 0.96]
    ti2v = load_ratio_file(_write(tmp_path, {**GOOD, "task": "ti2v-5B/i2v"}), task="ti2v-5B")
    assert ti2v.key == "ti2v-5B/i2v"


@pytest.mark.parametrize("data, match", [
    ("{not json", "is not valid JSON"),
    ([1, 2], "must be a JSON object"),
    ({**GOOD, "ratios": []}, "has no 'ratios'"),
    ({k: v for k, v in GOOD.items() if k != "ratios"}, "has no 'ratios'"),
    ({**GOOD, "ratios": [0.9, 0.8, 0.7], "sample_steps": 3}, "odd number of ratios"),
    ({**GOOD, "ratios": [0.9, "x", 0.7, 0.6]}, r"'ratios'\[1\] is 'x'"),
    ({**GOOD, "ratios": [0.9, True, 0.7, 0.6]}, r"'ratios'\[1\] is True"),
    ({**GOOD, "sample_steps": 4}, "sample_steps 4 needs 6"),
    ({**GOOD, "sample_steps": 1}, "sample_steps' >= 2"),
    ({**GOOD, "sample_shift": "5"}, "numeric 'sample_shift'"),
    ({**GOOD, "stds": [0.1]}, "1 stds for 4 ratios"),
    ({k: v for k, v in GOOD.items() if k != "task"}, "no 'task'"),
])
def test_bad_files_raise_one_line(tmp_path, data, match):
    with pytest.raises(RatioTableError, match=match) as info:
        load_ratio_file(_write(tmp_path, data))
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_nan_in_file_is_rejected(tmp_path):
    path = _write(tmp_path, json.dumps({**GOOD, "ratios": [0.9, float("nan"), 0.7, 0.6]}))
    with pytest.raises(RatioTableError, match="not a finite number"):
        load_ratio_file(path)


def test_missing_file_and_wrong_task(tmp_path):
    with pytest.raises(RatioTableError, match="does not exist"):
        load_ratio_file(tmp_path / "nope.json")
    with pytest.raises(RatioTableError, match="calibrated for t2v-A14B, not i2v-A14B"):
        load_ratio_file(_write(tmp_path, GOOD), task="i2v-A14B")


def test_a_table_made_under_other_settings_says_so(tmp_path):
    from magcache.calibrate import write_ratio_file
    from magcache.ratios import bundled_table, load_ratio_file, table_warnings

    path = write_ratio_file(tmp_path / "t.json", "t2v-A14B", 4, 12.0, [1.0] * 6,
                            meta={"sample_solver": "dpm++", "loras": ["style.safetensors"]})
    table = load_ratio_file(path)
    assert table.meta["sample_solver"] == "dpm++"
    assert table_warnings(table, shift=12.0, solver="dpm++", loras=["style.safetensors"]) == []
    warnings = table_warnings(table, shift=5.0, solver="unipc")
    assert len(warnings) == 3
    assert "shift 12" in warnings[0] and "dpm++ solver" in warnings[1] and "style.safetensors" in warnings[2]
    assert table_warnings(bundled_table("t2v-A14B"), shift=1.0, solver="dpm++") == []


def test_plan_shows_the_table_warning(tmp_path, capsys):
    import json

    from magcache.calibrate import write_ratio_file

    from launcher.cli import main

    path = write_ratio_file(tmp_path / "t.json", "t2v-A14B", 4, 12.0, [1.0] * 6, meta={"sample_solver": "dpm++"})
    assert main(["plan", "--task", "t2v-A14B", "--sample_steps", "4", "--magcache_ratios", str(path), "--json"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert any("calibrated with the dpm++ solver" in w for w in warnings)
