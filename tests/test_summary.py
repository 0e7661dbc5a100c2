"""eval.py --summary's side-by-side table: one row per method, the papers' order,
HM from the seed means."""
import json
import os

import tables


def fake_run(root, method, seed, base, novel, dataset="toy"):
    folder = os.path.join(root, method, f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    cfg = dict(method=method, protocol="base2novel", dataset=dataset, shots=16, seed=seed)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(dict(base_acc=base, novel_acc=novel, hm=0.0), f)


def test_side_by_side(tmp_path):
    fake_run(tmp_path, "pmpo", 1, 90.0, 60.0)
    fake_run(tmp_path, "pmpo", 2, 80.0, 70.0)
    fake_run(tmp_path, "zeroshot", 1, 40.0, 50.0)
    text = tables.summary([str(tmp_path)])
    table = text[text.index("side by side"):].splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| method")]
    # zero-shot first, whatever the folder order
    assert rows[0] == "| zeroshot | 1 | 40.00 | 50.00 | 44.44 |"
    # HM of the means: 2*85*65/150
    assert rows[1] == "| pmpo | 2 | 85.00 ± 7.07 | 65.00 ± 7.07 | 73.67 |"


def test_no_side_by_side_for_one_method(tmp_path):
    fake_run(tmp_path, "pmpo", 1, 90.0, 60.0)
    assert "side by side" not in tables.summary([str(tmp_path)])


def test_a_seed_run_twice_with_the_same_settings_counts_once(tmp_path):
    """The quick start's run and the benchmark's are one seed: the row
    counts 2, a note names both."""
    fake_run(tmp_path / "quick", "pmpo", 1, 90.0, 60.0)
    fake_run(tmp_path / "bench", "pmpo", 1, 90.0, 60.0)
    fake_run(tmp_path / "bench", "pmpo", 2, 80.0, 70.0)
    fake_run(tmp_path / "bench", "zeroshot", 1, 40.0, 50.0)
    text = tables.summary([str(tmp_path)])
    assert "| pmpo | 2 | 85.00 ± 7.07 | 65.00 ± 7.07 | 73.67 |" in text
    note = next(line for line in text.splitlines() if "counted once" in line)
    assert os.path.join(str(tmp_path), "bench", "pmpo", "seed1") in note
    assert os.path.join(str(tmp_path), "quick", "pmpo", "seed1") in note
    assert "the same results" in note
