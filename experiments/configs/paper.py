"""The paper's training recipes (NVLM 1.0, arXiv 2409.11402, Tables 10–11) for NVLM-D/X/H at 72B
and 34B, pretraining (stage 1) and SFT (stage 2).

    python experiments/train.py --config=experiments/configs/paper.py:D,72b,pretrain \\
        --config.init.checkpoint=/ckpt/nvlm_d_72b_init --config.data.root=/data/nvlm --workdir=...
    python experiments/train.py --config=experiments/configs/paper.py:H,34b,sft ...

The arg is `ARCH,SIZE,STAGE` (default D,72b,sft). Hyper-parameters follow the tables; the arch is
fixed by the arg (the tables differ per arch, so `--config.arch` would not update them).
Stage 1 starts from a converted checkpoint holding the pretrained ViT + LLM (and fresh projector
/ cross-attention blocks: set `--config.init.allow_missing=True` if the checkpoint lacks them);
stage 2 starts from the stage-1 result. Training runs in bf16 with float32 master weights and
optimizer state, full rematerialisation, and tensor parallelism 8 (as the paper's TP 8).
Pretraining data: Table 4's blend; SFT: Table 6's blend (see `nvlm_jax.data.blends`) under
`data.root`. Paper-scale held-out evaluation is left to `nvlm_jax.eval` (eval.samples_per_task=0).

Tiles (Table 10's "# tiles"): NVLM-D/X pretrain at low resolution, every image resized to ONE
448-px tile (`data.max_tiles=1`: no grid, no thumbnail, one tile slot per row); NVLM-H pretraining
and every SFT use dynamic high resolution with the model's 6 tiles + thumbnail (7 slots per row).
SFT prompts use the paper's SFT system message (App. E); pretraining the release's.
"""

from ml_collections import ConfigDict

SFT_SYSTEM_MESSAGE = "Follow the user's instruction and answer questions."  # as nvlm_jax.data.blends

# (stage, arch) -> Table 10 (pretrain) / Table 11 (SFT). Batch sizes are global; tiles: tile
# slots per row (1: every image is one tile; 7: up to 6 tiles + thumbnail).
# lr: (max, min); betas: (b1, b2); batch / min LR may depend on the size (34b, 72b).
TABLES = {
    ("pretrain", "D"): dict(batch=2048, lr=(1e-4, 2.5e-5), warmup=500, betas=(0.9, 0.95), wd=0.1, clip=10.0,
                            seq_len=512, tiles=1, steps=20_000),
    ("pretrain", "X"): dict(batch=2048, lr=(1e-4, 1e-5), warmup=1000, betas=(0.9, 0.95), wd=0.05, clip=1.0,
                            seq_len=512, tiles=1, steps=20_000),
    ("pretrain", "H"): dict(batch=2048, lr=(1e-4, 1e-5), warmup=1000, betas=(0.9, 0.98), wd=0.05, clip=1.0,
                            seq_len=512, tiles=7, steps=20_000),
    ("sft", "D"): dict(batch=128, lr=(2e-6, 2.5e-7), warmup=1000, betas=(0.9, 0.98), wd=0.1, clip=10.0,
                       seq_len=3200, tiles=7, steps=40_000),
    ("sft", "X"): dict(batch={"34b": 512, "72b": 256}, lr=(1e-5, {"34b": 1e-6, "72b": 1e-7}), warmup=500,
                       betas=(0.9, 0.98), wd=0.05, clip=1.0, seq_len=1024, tiles=7, steps=20_000),
    ("sft", "H"): dict(batch=256, lr=(1e-5, 1e-7), warmup=1000, betas=(0.9, 0.98), wd=0.05, clip=1.0,
                       seq_len=1280, tiles=7, steps=40_000),
}


def _for_size(value, size):
    return value[size] if isinstance(value, dict) else value


def get_config(arg: str | None = None) -> ConfigDict:
    arch, size, stage = (arg or "D,72b,sft").split(",")
    arch, size, stage = arch.upper(), size.lower(), stage.lower()
    if (stage, arch) not in TABLES or size not in ("72b", "34b"):
        raise ValueError(f"paper config arg must be ARCH,SIZE,STAGE with ARCH in D/X/H, SIZE 72b/34b, "
                         f"STAGE pretrain/sft; got {arg!r}")
    t = TABLES[(stage, arch)]
    c = ConfigDict()
    c.arch = arch
    c.stage = stage
    c.seed = 0
    c.num_steps = t["steps"]
    c.grad_accum_steps = 1
    c.log_every = 10
    c.max_nonfinite = 10
    c.peak_flops_per_device = 989e12  # H100 SXM dense bf16; set for your accelerator
    c.compilation_cache_dir = ""
    # Resume even if the config changed in ways that break exact resumption (the changes are logged).
    c.allow_resume_changes = False
    c.tokenizer = ""  # the init checkpoint's tokenizer files

    c.model = ConfigDict()
    c.model.preset = size
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"  # f32 master weights (Megatron --bf16 keeps them too)
    c.model.remat_policy = "full"
    c.model.attention_impl = "auto"
    c.model.llm = ConfigDict()
    c.model.vision = ConfigDict()

    c.init = ConfigDict(dict(checkpoint="", config_json="", allow_missing=False))

    c.data = ConfigDict()
    c.data.kind = "pretrain_blend" if stage == "pretrain" else "sft_blend"
    c.data.root = ""
    c.data.tasks = ConfigDict()
    c.data.train_size = 0
    c.data.eval_size = 0
    c.data.batch_size = _for_size(t["batch"], size)
    c.data.seq_len = t["seq_len"]
    c.data.tiles_per_row = t["tiles"]
    c.data.packing = arch == "D"
    c.data.num_workers = 8
    c.data.read_threads = 2
    # The prompt format (saved with every checkpoint; chat/eval read it back): tile tags
    # ("1d" as released, "none", "2d_grid", "2d_bbox"), the tile budget (0 = the model's max_tiles)
    # and the ChatML system message ("" = no system turn).
    c.data.tag_style = "1d"
    c.data.max_tiles = 1 if t["tiles"] == 1 else 0
    c.data.system_message = SFT_SYSTEM_MESSAGE if stage == "sft" else "Answer the questions."
    c.data.seed = 0
    c.data.num_shards = 0  # 0: one data shard per process (see nvlm_jax.train.multihost)

    c.eval = ConfigDict(dict(every=0, tasks=(), samples_per_task=0, batch_size=8))

    lr_max, lr_min = t["lr"]
    c.optim = ConfigDict(dict(lr_max=lr_max, lr_min=_for_size(lr_min, size), warmup_steps=t["warmup"], total_steps=0,
                              b1=t["betas"][0], b2=t["betas"][1], eps=1e-8, weight_decay=t["wd"],
                              clip_norm=t["clip"], mu_dtype="float32"))
    c.checkpoint = ConfigDict(dict(every=500, keep=3, keep_best=0, best_metric="eval/exact_match", best_mode="max",
                                   async_save=True))
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=8, num_devices=0))
    # LoRA adapters instead of full SFT (rank 0 = off), e.g. --config.lora.rank=64.
    c.lora = ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets="llm"))
    return c
