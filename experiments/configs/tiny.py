"""Tiny NVLM trained from scratch on the built-in synthetic tasks (CPU main job, tests).

    python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/tiny
    python experiments/train.py --config=experiments/configs/tiny.py:X --workdir=/tmp/tiny_x
    python experiments/train.py --config=experiments/configs/tiny.py --config.arch=H ...

The arg (or `--config.arch`) picks D, X or H. Stage "full" trains everything, the ViT included:
from scratch, a frozen random ViT would be a poor encoder (the paper stages start from a
pretrained ViT and LLM; see `nvlm_jax/train/freeze.py`).
"""

from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.arch = (arg or "D").upper()
    c.stage = "full"
    c.seed = 0
    c.num_steps = 1000
    c.grad_accum_steps = 1
    c.log_every = 20
    c.max_nonfinite = 5
    c.peak_flops_per_device = 0.0  # 0: measure a bf16 matmul at start
    c.compilation_cache_dir = ""
    # Resume even if the config changed in ways that break exact resumption (the changes are logged).
    c.allow_resume_changes = False
    c.tokenizer = "tiny"

    c.model = ConfigDict()
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "none"
    c.model.attention_impl = "xla"
    c.model.llm = ConfigDict(dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                                  num_kv_heads=2, head_dim=32))
    c.model.vision = ConfigDict(dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4))

    c.init = ConfigDict(dict(checkpoint="", config_json="", allow_missing=False))

    c.data = ConfigDict()
    c.data.kind = "synthetic"
    c.data.root = ""
    c.data.tasks = ConfigDict({"colour": 1.0, "shape": 1.0})
    c.data.train_size = 100_000
    c.data.eval_size = 1_000
    # Colour/shape samples are 31-39 tokens and one 28-px tile: one sample per 40-token row for
    # every arch (D packs nothing at this length). Raise seq_len / tiles_per_row for other tasks
    # (count, ocr and chart images need several tiles and longer answers).
    c.data.batch_size = 48
    c.data.seq_len = 40
    c.data.tiles_per_row = 1
    c.data.packing = True
    c.data.num_workers = 1  # one grain worker process prepares batches while the step runs
    c.data.read_threads = 0
    # The prompt format (saved with every checkpoint; chat/eval read it back): tile tags
    # ("1d" as released, "none", "2d_grid", "2d_bbox"), the tile budget (0 = the model's max_tiles)
    # and the ChatML system message ("" = no system turn).
    c.data.tag_style = "1d"
    c.data.max_tiles = 0
    c.data.system_message = "Answer the questions."
    c.data.seed = 0
    # Record-wise data shards making up the global batch; 0 = one per process. Fix it (e.g. 2)
    # to get the same batches on any process count dividing it (and to resume on one).
    c.data.num_shards = 0

    c.eval = ConfigDict(dict(every=250, tasks=(), samples_per_task=100, batch_size=48))

    c.optim = ConfigDict(dict(lr_max=3e-3, lr_min=3e-4, warmup_steps=30, total_steps=0, b1=0.9, b2=0.98,
                              eps=1e-8, weight_decay=0.05, clip_norm=1.0, mu_dtype=None))
    c.checkpoint = ConfigDict(dict(every=250, keep=2, keep_best=1, best_metric="eval/exact_match",
                                   best_mode="max", async_save=True))
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_devices=0))
    # LoRA adapters (rank 0 = off); see nvlm_jax/config.py LoraConfig.
    c.lora = ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets="llm"))
    return c
