"""A stage's prepared data as the workers load it, including an empty held-out split."""

import json

from rlhf.config import load_config
from rlhf.train.loop import StageData, evaluate
from rlhf.train.trainer import prepare_stage_data


def test_a_stage_without_held_out_files_loads_an_empty_eval_split_and_evaluates_nothing(
    tmp_path,
):
    from rlhf.models.tokenizer import build_byte_tokenizer

    build_byte_tokenizer().save_pretrained(str(tmp_path / "tok"))
    rows = [json.dumps({"input": f"{i}+1=", "output": str(i + 1)}) for i in range(4)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.stages=[sft]",
            f"sft.train_files=[{{path: {tmp_path / 'train.jsonl'}}}]",
            "sft.eval_files=[]",
        ],
    )
    report = prepare_stage_data(cfg, "sft", str(tmp_path / "tok"), tmp_path / "sft")
    data = StageData.load(tmp_path / "sft" / "data")  # used to raise IndexError in `datasets`
    assert len(data.train) == report["train"]["samples"] > 0
    assert len(data.eval) == 0 and report["eval"]["samples"] == 0
    # Every rank sees the same empty split: no forward pass, no collective, no eval metrics.
    assert evaluate(None, None, data.eval, rank=0, world=2, batch_size=8) == {}
