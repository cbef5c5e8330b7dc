import pytest

from nvlm_jax.train import resume


def test_only_changes_that_break_exact_resumption_are_reported():
    saved = {"num_steps": 10, "stage": "sft", "data": {"batch_size": 8, "num_workers": 1, "tasks": {"a": 1.0}},
             "model": {"param_dtype": "float32"}, "eval": {"every": 5}, "mesh": {"fsdp": -1}}
    current = {"num_steps": 20, "stage": "pretrain", "data": {"batch_size": 8, "num_workers": 4, "tasks": {"a": 2.0}},
               "model": {"param_dtype": "bfloat16"}, "eval": {"every": 1}, "mesh": {"fsdp": 2}}
    assert resume.config_changes(saved, current) == [
        "data.tasks.a: 1.0 -> 2.0", "model.param_dtype: 'float32' -> 'bfloat16'", "stage: 'sft' -> 'pretrain'"]


def test_identical_configs_have_no_changes_and_pass():
    c = {"data": {"seq_len": 64, "tasks": {}}, "arch": "D", "lists": [1, {"x": 2}]}
    assert resume.config_changes(c, dict(c)) == []
    assert resume.check_resume_config(c, c, "ckpt/3", allow=False) == []


def test_refusal_names_the_checkpoint_and_every_change_and_allow_lets_it_through():
    with pytest.raises(resume.ResumeConfigError, match=r"ckpt/3: .*data.seq_len: 64 -> 128; new_key: \(absent\) -> 1"):
        resume.check_resume_config({"data": {"seq_len": 64}}, {"data": {"seq_len": 128}, "new_key": 1}, "ckpt/3",
                                   allow=False)
    assert resume.check_resume_config({"a": 1}, {"a": 2}, "ckpt/3", allow=True) == ["a: 1 -> 2"]
