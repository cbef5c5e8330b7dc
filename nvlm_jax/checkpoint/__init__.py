"""Checkpoints: one home for finding, reading, restoring, importing and exporting them.

    paths.py      one path layer (local, file://, gs:// and other fsspec schemes)
    folders.py    which kind a path is (HF release, converted, training workdir, one step): `locate`
    restore.py    config / prompt format / tokenizer spec of any kind, and the one sharded restore
    hf_folder.py  reading a Hugging Face safetensors folder (headers, index, layout)
    copying.py    streaming copies of source tensors (blocks, strided runs)
    plan.py       the validated HF -> params plan (`weight_map.py` is its table)
    writers.py    Orbax streamed / sharded writers and the converted-folder layout
    hf_import.py  `convert`, `convert_sharded`, `load_hf_params`
    export.py     params -> release-layout safetensors (`export_hf`, `export_checkpoint`)
    assemble.py   standalone InternViT + LLM -> a fresh NVLM checkpoint
    progress.py   the conversion progress bar

`nvlm_jax.load_pretrained` and the CLIs (`chat`, `eval`, `convert`, `serve`) and the training
launcher's init all go through `folders.locate` and `restore`.
"""

from nvlm_jax.checkpoint.folders import CheckpointNotFoundError, Located, locate
from nvlm_jax.checkpoint.paths import as_path
from nvlm_jax.checkpoint.restore import CheckpointInfo, read_config, read_info

__all__ = ["CheckpointInfo", "CheckpointNotFoundError", "Located", "as_path", "locate", "read_config", "read_info"]
