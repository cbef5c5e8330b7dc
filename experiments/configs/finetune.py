"""Fine-tune a trained or released NVLM on your own data (supervised, stage-2 style).

    python experiments/train.py --config=experiments/configs/finetune.py \\
        --config.init.checkpoint=MODEL --config.data.train=train.jsonl --config.data.eval=eval.jsonl \\
        --config.data.image_root=DIR --workdir=DIR

MODEL is any checkpoint `nvlm_jax` reads (a Hugging Face release folder, a converted folder, a
training workdir); the arch, tokenizer and prompt format (tile tags, tile budget, system
message) are taken from it. `data.train` / `data.eval` are files, or several entries
`path[:weight],path[:weight]` mixed by weight (a list in a config file works too): LLaVA JSONL,
ShareGPT, OpenAI/HF chat `messages` with text/image/image_url parts, a JSON list of such
records, ArrayRecord files of them, or `tfds:NAME[/CONFIG][:SPLIT]` (see
`nvlm_jax/data/files.py` and `formats.py`). Image paths are resolved under `data.image_root`
(default: each file's folder) and must stay under it. Held-out exact match and loss are
computed on `data.eval` (every `eval.every` steps and at the end); the best checkpoint by
held-out loss is kept.

Stage "sft" trains as the paper's stage 2: the LLM and the projector (D) / cross-attention (X) /
both (H); the ViT stays frozen. The defaults suit a real checkpoint (bf16 compute, f32 master
weights, 6 tiles + thumbnail per image); for the tiny CPU model of the main job pass
`--config.data.seq_len=64 --config.data.tiles_per_row=1` (see README, "Fine-tune on your own data").
"""

from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
    del arg
    c = ConfigDict()
    c.arch = ""  # the init checkpoint's
    c.stage = "sft"
    c.seed = 0
    c.num_steps = 1000
    c.grad_accum_steps = 1
    c.log_every = 10
    c.max_nonfinite = 5
    c.peak_flops_per_device = 0.0  # 0: measure a bf16 matmul at start
    c.compilation_cache_dir = ""
    # Resume even if the config changed in ways that break exact resumption (the changes are logged).
    c.allow_resume_changes = False
    c.tokenizer = ""  # the init checkpoint's tokenizer

    c.model = ConfigDict()
    c.model.preset = "tiny"  # unused: the model comes from init.checkpoint
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "full"
    c.model.attention_impl = "auto"
    c.model.llm = ConfigDict()
    c.model.vision = ConfigDict()

    c.init = ConfigDict(dict(checkpoint="", config_json="", allow_missing=False))

    c.data = ConfigDict()
    c.data.kind = "files"
    c.data.train = ""  # file, or "path[:weight],path[:weight]" (nvlm_jax/data/files.py)
    c.data.eval = ""  # held-out file(s); "" = no evaluation
    c.data.image_root = ""  # "" = each data file's folder
    c.data.format = "auto"  # record format: auto (per record), llava, sharegpt, messages
    c.data.tfds_data_dir = ""  # for tfds: entries; "" = TFDS's default folder
    c.data.root = ""
    c.data.tasks = ConfigDict()
    c.data.train_size = 0
    c.data.eval_size = 0
    c.data.batch_size = 16
    c.data.seq_len = 4096  # NVLM-D packs several samples per row; X/H hold one sample per row
    c.data.tiles_per_row = 7  # up to 6 tiles + thumbnail
    c.data.packing = True
    c.data.num_workers = 1
    c.data.read_threads = 2
    # "init": ask as the init checkpoint was trained (its saved tile tags, tile budget and system
    # message); "" uses tag_style / max_tiles / system_message below.
    c.data.prompt_format = "init"
    c.data.tag_style = "1d"
    c.data.max_tiles = 0
    c.data.system_message = ""
    c.data.seed = 0
    c.data.num_shards = 0  # 0: one data shard per process (see nvlm_jax.train.multihost)

    c.eval = ConfigDict(dict(every=200, tasks=(), samples_per_task=200, batch_size=8))

    # Small data: a low peak LR, short warm-up, decay to a tenth; mild weight decay.
    c.optim = ConfigDict(dict(lr_max=1e-5, lr_min=1e-6, warmup_steps=10, total_steps=0, b1=0.9, b2=0.98,
                              eps=1e-8, weight_decay=0.01, clip_norm=1.0, mu_dtype="float32"))
    c.checkpoint = ConfigDict(dict(every=200, keep=2, keep_best=1, best_metric="eval/loss", best_mode="min",
                                   async_save=True))
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_devices=0))

    # LoRA: rank 0 = full fine-tuning of the stage's parts; rank > 0 = low-rank adapters on the
    # targets ("llm", "llm_attention", "llm_mlp", "vision", "projector"; comma-separated) with their
    # base weights frozen (nvlm_jax/config.py LoraConfig). Typical: rank 16-64, alpha = 2 x rank,
    # and a higher LR than full SFT (e.g. --config.optim.lr_max=2e-4).
    c.lora = ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets="llm"))
    return c
