"""The LLM route's offline demo, `dinobridge demo-vlm`.

The full run is marked slow (about 9.5 minutes on 2 cores): the default test run skips it, `.ci/run`
runs it and asserts the demo's accuracy on held-out scenes. A tiny run in the default suite checks the
demo's machinery.
"""

from __future__ import annotations

import pytest

from bridge.cli import main
from training.vlm_demo import NEW_KIND, ORIGINAL_KINDS, VLMDemoSettings, run_vlm_demo


def test_demo_machinery_on_a_tiny_run(tmp_path):
    settings = VLMDemoSettings(
        base_scenes=48,
        prealign_steps=2,
        base_steps=2,
        lora_scenes=24,
        lora_steps=2,
        held_out_scenes=6,
        batch_size=8,
    )
    result = run_vlm_demo(tmp_path / "demo", settings, progress=False)
    assert set(result.before) >= {*ORIGINAL_KINDS, NEW_KIND} and set(result.after) >= {
        *ORIGINAL_KINDS,
        NEW_KIND,
    }
    assert result.frozen_unchanged
    report = result.report()
    assert all(kind in report for kind in (*ORIGINAL_KINDS, NEW_KIND))
    assert (tmp_path / "demo" / "vlm" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_demo_vlm_answers_and_learns_counting_with_lora(tmp_path, capsys):
    assert main(["demo-vlm", "--out", str(tmp_path / "demo")]) == 0
    report = capsys.readouterr().out
    print(report)
    table = {}
    for line in report.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] in (*ORIGINAL_KINDS, NEW_KIND):
            table[words[0]] = (float(words[1]), float(words[2]))  # before LoRA, after LoRA
    assert set(table) == {*ORIGINAL_KINDS, NEW_KIND}, report
    assert "bitwise unchanged by LoRA: True" in report
    # Measured 0.974 / 0.927 / 0.941 (docs/llm-route.md); 0.85 leaves a margin for another CPU's float rounding.
    for kind in ORIGINAL_KINDS:
        before, after = table[kind]
        assert before >= 0.85, f"{kind}: held-out accuracy {before:.3f} below 0.85\n{report}"
        assert after >= before - 0.05, (
            f"{kind}: dropped from {before:.3f} to {after:.3f} after LoRA\n{report}"
        )
    before, after = table[NEW_KIND]
    assert after >= 0.8 and after > before, f"counting {before:.3f} -> {after:.3f}\n{report}"
