"""The ``mlx-gemma`` command line: convert, generate, chat, cache-prompt, inspect."""

from __future__ import annotations

import functools
import sys

import click


def _clean_errors(fn):
    """Expected failures (bad files, bad options) become one 'Error: ...' line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, KeyError) as e:
            msg = str(e) if not isinstance(e, KeyError) else f"missing {e}"
            raise click.ClickException(msg.splitlines()[0] if msg else type(e).__name__) from None

    return wrapper


def _kv_options(fn):
    fn = click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
                      help="Group size along head_dim of the quantized KV cache.")(fn)
    return click.option("--kv-bits", type=click.IntRange(2, 8), default=None,
                        help="Store the KV cache quantized at 8 or 4 bits (2, 3, 5, 6 also run), on every layer "
                             "(default: the compute dtype).")(fn)


def _widen_option(fn):
    return click.option(
        "--widen/--no-widen", default=None,
        help="Hold float16 weights and scales as float32 copies: exact, faster on the CPU, more memory "
             "(default: on with float32 compute, i.e. the CPU; --no-widen keeps the file's precision).")(fn)


@click.group()
@click.version_option(package_name="mlx-gemma-qat")
def main():
    """Gemma 3 QAT models with MLX: exact conversion, generation, inspection."""


@main.command()
@click.argument("src")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output MLX folder.")
@click.option("--q6k", type=click.Choice(["int8", "float32"]), default="int8", show_default=True,
              help="Q6_K has no exact group-32 form: 8-bit re-grid (exact on one sub-block of two) or dense float32.")
@click.option("--mmproj", type=click.Path(), default=None,
              help="llama.cpp's vision file (mmproj GGUF) to convert together with the text GGUF SRC.")
@click.option("--dequantize", is_flag=True,
              help="GGUF: write every tensor as dense floats (the Hugging Face form, e.g. for mlx_lm.convert).")
@click.option("--mode", type=click.Choice(["q4_0", "affine", "none"]), default="q4_0", show_default=True,
              help="Float checkpoints: symmetric Q4_0 grid (QAT), MLX min/max affine, or keep floats.")
@click.option("--bits", type=int, default=4, show_default=True, help="Bits for --mode affine.")
@click.option("--group-size", type=int, default=32, show_default=True, help="Group size for --mode affine.")
@click.option("--embed-bits", type=int, default=None, help="Quantize a float embedding too (affine).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Storage dtype of dense tensors (default: as in the source).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_clean_errors
def convert(src, out, q6k, mmproj, dequantize, mode, bits, group_size, embed_bits, dtype, force, quiet):
    """Convert SRC (a GGUF file, a Hugging Face folder or repo id) into an MLX folder."""
    from .convert import convert as run

    path = run(src, out, q6k=q6k, mmproj=mmproj, dequantize=dequantize, mode=mode, bits=bits, group_size=group_size, embed_bits=embed_bits,
               dtype=dtype, force=force, progress=not quiet)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--model", "-m", default=None, help="MLX folder, GGUF file, HF folder or repo id (default: embedded Gemma 3 270M).")
@click.option("--mmproj", default=None, type=click.Path(),
              help="With a text GGUF --model: llama.cpp's vision GGUF (mmproj), to read --image.")
@click.option("--prompt", "-p", required=True, help="Prompt text ('-' reads standard input).")
@click.option("--max-tokens", "-n", type=int, default=256, show_default=True)
@click.option("--temp", type=float, default=0.0, show_default=True)
@click.option("--top-p", type=float, default=0.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--chat/--raw", default=None,
              help="Apply the chat template or not (default: when the model ships one, i.e. instruction-tuned).")
@click.option("--system", default=None, help="System prompt (folded into the first user turn).")
@click.option("--image", "images", multiple=True, help="Image path or URL (repeatable; needs a vision model).")
@click.option("--pan-and-scan", is_flag=True,
              help="Also show the model 2-4 crops of each elongated image (aspect ratio >= 1.2), as Gemma 3 can.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Compute dtype (default: float32 on CPU, bfloat16 on GPU).")
@click.option("--prefill-step", type=int, default=256, show_default=True)
@_kv_options
@click.option("--prompt-cache", type=click.Path(dir_okay=False), default=None,
              help="Resume from a file made by cache-prompt (same model and dtype; --kv-bits, if given, must match "
                   "it). Raw: --prompt continues the cached text, or is the full prompt if it starts with it; chat: "
                   "the cached text is the system part and --prompt the user message. Only the tokens after the "
                   "cached prefix are prefilled.")
@click.option("--stats/--no-stats", default=True, show_default=True, help="Print speed and memory after the text.")
@_widen_option
@_clean_errors
def generate(model, mmproj, prompt, max_tokens, temp, top_p, top_k, min_p, seed, chat, system, images, pan_and_scan, dtype,
             prefill_step, kv_bits, kv_group_size, prompt_cache, stats, widen):
    """Generate text, streaming tokens as they come."""
    from . import load
    from .generate import format_stats, stream_generate

    if prompt == "-":
        prompt = sys.stdin.read()
    m, tok = load(model, mmproj=mmproj, dtype=dtype, widen=widen)
    last = None
    for last in stream_generate(m, tok, prompt, max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                                seed=seed, chat=chat, system=system, images=list(images) or None, pan_and_scan=pan_and_scan,
                                prefill_step_size=prefill_step, kv_bits=kv_bits, kv_group_size=int(kv_group_size),
                                prompt_cache=prompt_cache):
        click.echo(last.text, nl=False)
    click.echo()
    if stats and last is not None:
        click.echo("=" * 10, err=True)
        click.echo(format_stats(last), err=True)


@main.command()
@click.option("--model", "-m", default=None, help="MLX folder, GGUF file, HF folder or repo id (default: embedded Gemma 3 270M).")
@click.option("--mmproj", default=None, type=click.Path(), help="With a text GGUF --model: llama.cpp's vision GGUF.")
@click.option("--system", default=None, help="System prompt.")
@click.option("--image", "images", multiple=True, help="Image(s) for the first message (later: /image PATH).")
@click.option("--pan-and-scan", is_flag=True, help="Also show the model crops of elongated images.")
@click.option("--max-tokens", "-n", type=int, default=512, show_default=True, help="Most tokens per reply.")
@click.option("--temp", type=float, default=0.0, show_default=True)
@click.option("--top-p", type=float, default=0.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Compute dtype (default: float32 on CPU, bfloat16 on GPU).")
@_kv_options
@click.option("--stats", is_flag=True, help="Print prompt/decode speed and cache use after each reply.")
@_widen_option
@_clean_errors
def chat(model, mmproj, system, images, pan_and_scan, max_tokens, temp, top_p, top_k, min_p, seed, dtype, kv_bits,
         kv_group_size, stats, widen):
    """Chat in the terminal; the KV cache carries over between turns.

    Type a message and press Enter. Commands: /image PATH (attach to the next message), /reset, /quit.
    """
    from . import load
    from .chat import ChatSession
    from .generate import format_stats

    m, tok = load(model, mmproj=mmproj, dtype=dtype, widen=widen)
    session = ChatSession(m, tok, system=system, pan_and_scan=pan_and_scan, kv_bits=kv_bits,
                          kv_group_size=int(kv_group_size))
    pending = list(images)
    if seed is not None:
        import mlx.core as mx

        mx.random.seed(seed)
    click.echo("Chat with the model: /image PATH attaches an image, /reset starts over, /quit ends.", err=True)
    while True:
        try:
            line = click.prompt(">>", prompt_suffix=" ", default="", show_default=False, err=True)
        except click.exceptions.Abort:  # end of input (Ctrl-D) or Ctrl-C
            click.echo(err=True)
            break
        text = line.strip()
        if text in ("/quit", "/exit", "/q"):
            break
        if text == "/reset":
            session.reset()
            pending = []
            click.echo("(conversation cleared)", err=True)
            continue
        if text.startswith("/image "):
            pending.append(text[len("/image "):].strip())
            continue
        if not text:
            continue
        try:
            last = None
            for last in session.send(text, pending, max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p):
                click.echo(last.text, nl=False)
            click.echo()
            pending = []
            if stats and last is not None:
                click.echo(format_stats(last) + f"\n(prompt tokens reused from the cache: {session.reused_tokens})",
                           err=True)
        except ValueError as e:  # a bad image, a full context: the session goes on without that message
            click.echo(f"Error: {e}", err=True)
            pending = []


@main.command("cache-prompt")
@click.option("--model", "-m", default=None, help="MLX folder, GGUF file, HF folder or repo id (default: embedded Gemma 3 270M).")
@click.option("--prompt", "-p", required=True, help="The prefix text to cache ('-' reads standard input).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Prompt-cache file to write (safetensors).")
@click.option("--chat/--raw", default=None,
              help="Cache the text as the system part of a chat's first user turn, or raw after BOS "
                   "(default: chat when the model ships a template).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Compute dtype (default: float32 on CPU, bfloat16 on GPU); generate must use the same.")
@click.option("--prefill-step", type=int, default=256, show_default=True)
@_kv_options
@_clean_errors
def cache_prompt(model, prompt, out, chat, dtype, prefill_step, kv_bits, kv_group_size):
    """Prefill a prompt once and save its KV cache, for `generate --prompt-cache`."""
    from . import load
    from .prompt_cache import cache_prompt as run

    if prompt == "-":
        prompt = sys.stdin.read()
    m, tok = load(model, dtype=dtype)
    pc = run(m, tok, prompt, out, chat=chat, kv_bits=kv_bits, kv_group_size=int(kv_group_size),
             prefill_step_size=prefill_step)
    kv = "float" if pc.kv_bits is None else f"{pc.kv_bits}-bit g{pc.kv_group_size}"
    mode = "chat (system part)" if pc.chat else "raw"
    click.echo(f"cached {len(pc.tokens)} tokens ({mode}, {pc.dtype}, {kv} KV cache) to {out}")


@main.command()
@click.argument("path")
@click.option("--context", type=int, default=8192, show_default=True, help="Context length for the KV cache estimate.")
@click.option("--kv-bits", type=click.Choice(["4", "8"]), default=None,
              help="Show the KV cache at these bits (default: 8 and 4 beside float32 and bfloat16).")
@click.option("--kv-group-size", type=int, default=64, show_default=True, help="Group size of the quantized KV cache.")
@_clean_errors
def inspect(path, context, kv_bits, kv_group_size):
    """Show architecture, per-tensor precision, size on disk and memory once loaded of a GGUF file or MLX folder."""
    from .inspect import format_report, inspect_path

    click.echo(format_report(inspect_path(path), context, int(kv_bits) if kv_bits else None, kv_group_size))


if __name__ == "__main__":
    main()
