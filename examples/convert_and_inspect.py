"""Convert a GGUF exactly into an MLX folder, inspect its precision, and load it with mlx-lm too.

    python examples/convert_and_inspect.py [model.gguf] [out_dir]
"""

import sys
from pathlib import Path

from mlx_gemma_qat import convert
from mlx_gemma_qat.inspect import format_report, inspect_path
from mlx_gemma_qat.models_cache import default_gguf

src = Path(sys.argv[1]) if len(sys.argv) > 1 else default_gguf()
out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("gemma3-mlx")

convert(src, out, force=True)
print(format_report(inspect_path(out), context=4096))

# The folder is a standard MLX model folder: mlx-lm reads it as well (text only).
from mlx_lm import load as mlx_lm_load

model, tokenizer = mlx_lm_load(str(out))
print("mlx_lm.load OK:", type(model).__module__)
