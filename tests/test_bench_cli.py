"""The benchmark and the command line, on the tiny model."""

import json
from pathlib import Path

import pytest

from neeko.cli import main

KEYS = {
    "tok_s_base_b1",
    "tok_s_gated_b1",
    "overhead_vs_base_b1",
    "tok_s_k1_b16",
    "tok_s_k8_b16",
    "tok_s_k16_b16",
    "mixed_vs_single_k8",
    "mixed_vs_single_k16",
    "tok_s_peft_k1_b16",
    "tok_s_peft_k8_b16",
    "speedup_vs_peft_k8",
    "lora_time_vs_peft_k8",
    "switch_ms",
    "peft_load_set_ms",
    "tok_s_1000_chars_b16",
    "tok_s_10_chars_b16",
    "scale_1000_vs_10",
    "mixed_matches_alone",
    "decode_b1_vs_floor",
    "decode_b1_long_vs_short",
    "compiled_vs_eager_b1",
    "compiled_vs_eager_k8_b16",
    "lowp_vs_fp32_b1",
    "compiled_tokens_identical",
    "read_gb_s",
    "model",
    "device",
    "torch",
    "threads",
}


@pytest.mark.slow
def test_bench_engine_json_on_tiny(capsys):
    assert main(["bench", "engine", "--model", "tiny", "--quick", "--rounds", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result.keys() >= KEYS
    assert result["mixed_matches_alone"] is True
    assert result["model"] == "tiny"
    assert result["device"] == "cpu"
    assert all(result[k] > 0 for k in KEYS if k.startswith("tok_s_"))
    ratio = result["tok_s_k8_b16"] / result["tok_s_k1_b16"]
    assert result["mixed_vs_single_k8"] == pytest.approx(ratio, rel=1e-2)
    assert result["followup_tokens_identical"] is True
    assert 0 < result["followup_cached_tokens"] < result["followup_prompt_tokens"]
    assert result["followup_prompt_tokens"] > 1500
    assert result["compiled_tokens_identical"] is True
    assert result["compiled_tokens_identical_by_k"].keys() == {"1", "3", "8", "16", "b1"}
    ratio = result["tok_s_compiled_b1"] / result["tok_s_gated_b1"]
    assert result["compiled_vs_eager_b1"] == pytest.approx(ratio, rel=1e-2)
    assert result["read_gb_s"] > 0
    by_weights = result["lowp_vs_fp32_b1_by_weights"]
    assert by_weights.keys() == {"int8", "int4"}
    assert result["lowp"] == max(by_weights, key=by_weights.get)  # the faster for one user
    assert result["lowp_vs_fp32_b1"] == by_weights[result["lowp"]]
    assert result["lowp_b1_step"] == ("native" if result["lowp"] == "int8" else "graph")
    assert result["b1_step"] == "native"  # the C compiler inductor needs builds it too
    assert result["b16_step"] == "native"
    assert result["lowp_b16_step"] == ("native" if result["lowp"] == "int8" else "graph")
    assert result["weights_read_gb_s"] > 0
    ratio = result["tok_s_compiled_b1"] / (result["weights_read_gb_s"] / result["weight_gb"])
    # The printed figures are rounded (GB/s to 0.01, GB to 1e-4): a slow, busy machine's
    # read of the tiny model's weights can be a few GB/s, where that rounding is ~1%.
    rounding = 0.005 / result["weights_read_gb_s"] + 5e-5 / result["weight_gb"]
    assert result["decode_b1_vs_weights_read"] == pytest.approx(ratio, rel=1e-2 + rounding)
    ratio = result["ttft_ms_followup_reused"] / result["ttft_ms_followup_full"]
    assert result["ttft_followup_vs_full"] == pytest.approx(ratio, rel=1e-2)
    assert result["long_prompt_tokens"] > 1500
    assert result["tpot_ms_compiled_b1_long"] > 0
    assert result["decode_b1_long_vs_short"] > 0


@pytest.mark.redis
def test_bench_queue_json_on_tiny(capsys):
    assert main(["bench", "queue", "--model", "tiny", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = {"queue_overhead_ms_p50", "queue_overhead_ms_p99", "batching_speedup"}
    assert result.keys() >= keys | {"tok_s_batched", "tok_s_max_batch_1", "ttft_direct_ms_p50"}
    assert 0 < result["queue_overhead_ms_p50"] <= result["queue_overhead_ms_p99"]
    ratio = result["tok_s_batched"] / result["tok_s_max_batch_1"]
    assert result["batching_speedup"] == pytest.approx(ratio, rel=1e-2)
    assert (result["turns"], result["characters"], result["model"]) == (64, 8, "tiny")


def test_train_cast_then_demo_and_characters(capsys, tmp_path):
    store = str(tmp_path / "store")
    args = ["--model", "tiny", "--store", store]
    assert main(["train", "--cast", *args, "--max-steps", "2"]) == 0
    assert "trained 4 characters in 2 steps" in capsys.readouterr().out
    assert main(["characters", "--store", store, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {c["status"] for c in listed} == {"trained"}
    assert "Captain Mara Vell" in {c["name"] for c in listed}
    assert main(["demo", *args, "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "Captain Mara Vell:" in out
    assert "(fused) a grumpy old lighthouse keeper" in out
    assert "5 characters in one batch" in out


def test_demo_without_blocks_for_the_model_plays_from_profiles(capsys, tmp_path):
    assert main(["demo", "--model", "tiny", "--store", str(tmp_path), "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "neeko train --cast --model tiny" in err
    assert "5 characters in one batch" in out


def test_cli_reports_user_errors_without_traceback(capsys, tmp_path):
    assert main(["fuse", "--store", str(tmp_path), "--card", str(tmp_path / "missing.json")]) == 1
    assert "neeko: error:" in capsys.readouterr().err


def test_train_and_eval_a_store_from_cards_and_data(capsys, tmp_path):
    cast = Path(__file__).parent.parent / "neeko" / "data" / "cast"
    cards = [str(cast / n / "card.json") for n in ("bolt", "hana_sato")]
    train = [str(cast / n / "train.jsonl") for n in ("bolt", "hana_sato")]
    held = [str(cast / n / "heldout.jsonl") for n in ("bolt", "hana_sato")]
    store = str(tmp_path / "store")
    common = ["--model", "tiny", "--store", store]
    assert main(["train", *common, "--cards", *cards, "--data", *train, "--max-steps", "2"]) == 0
    assert "trained 2 characters" in capsys.readouterr().out
    assert main(["eval", *common, "--data", *held, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table["characters"]) == {"BOLT-7", "Sato Hana"}
    row = table["characters"]["BOLT-7"]
    assert {"nll_own", "nll_fused", "nll_base"} <= row.keys()
    assert all(row[k] > 0 for k in ("nll_own", "nll_fused", "nll_base"))


def test_train_refuses_dialogues_without_a_card(capsys, tmp_path):
    cast = Path(__file__).parent.parent / "neeko" / "data" / "cast"
    args = [
        "train",
        "--model",
        "tiny",
        "--store",
        str(tmp_path),
        "--cards",
        str(cast / "bolt" / "card.json"),
        "--data",
        str(cast / "hana_sato" / "train.jsonl"),
    ]
    assert main(args) == 1
    assert "no card for character 'Sato Hana'" in capsys.readouterr().err
