"""The ``mlx-gemma`` command line: convert, generate, chat, serve, cache-prompt, inspect, lora, fuse, perplexity,
kld, compare."""

from __future__ import annotations

import functools
import json
import shlex
import sys
from dataclasses import dataclass

import click


def _clean_errors(fn):
    """Expected failures (bad files, bad options) become one 'Error: ...' line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .world import PeerFailed

        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, KeyError, PeerFailed) as e:
            msg = str(e) if not isinstance(e, KeyError) else f"missing {e}"
            msg = msg.splitlines()[0] if msg else type(e).__name__
            world = getattr(e, "stopped_with", None)  # the ranks of a split model stopped together
            if world is None:
                raise click.ClickException(msg) from None
            if not e.said_by_rank0:
                click.echo(f"Error: {msg}" if world.rank == 0 else f"Error (rank {world.rank}): {msg}", err=True)
            world.barrier()  # none exits (mlx.launch then stops the rest) before the others have said theirs
            sys.exit(1)

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


def _scales_option(fn):
    return click.option(
        "--scales", type=click.Choice(["stored", "float32"]), default=None,
        help="How quantized scales are held with bfloat16 compute: stored (float16 as in the file; MLX widens them "
             "to float32 on every matmul) or float32 (widened once: exact, fewer bytes read per token, 1 bit per "
             "weight more memory). Default: float32 when that and the KV cache fit the device's memory, on a GPU; "
             "the CPU keeps --widen's rule. `mlx-gemma inspect` shows the bytes per token of each.")(fn)


def _constraint_options(fn):
    fn = click.option("--grammar", "grammar_file", default=None, metavar="FILE",
                      help="Constrain the output to a Lark grammar (llguidance's dialect, starting at `start`) "
                           "read from FILE.")(fn)
    fn = click.option("--regex", default=None, metavar="R",
                      help="Constrain the output to match the regex R whole (Rust syntax: no look-around or "
                           "back-references).")(fn)
    fn = click.option("--json", "json_object", is_flag=True, help="Constrain the output to a JSON object.")(fn)
    return click.option("--json-schema", default=None, metavar="FILE_OR_JSON",
                         help="Constrain the output to JSON valid under this schema: a .json file or the schema's "
                              "JSON text. The output ends where the constraint is complete.")(fn)


def _speculative_options(fn):
    fn = click.option("--prompt-lookup", is_flag=True,
                      help="Speculative decoding with drafts from the text so far (n-gram lookup, no second model): "
                           "fast on rewrites, summaries and code edits.")(fn)
    fn = click.option("--num-draft-tokens", type=click.IntRange(1, 32), default=None,
                      help="Tokens drafted per target forward (default: 3 with a draft model, 4 with lookup).")(fn)
    return click.option("--draft-model", default=None, metavar="MODEL",
                        help="Speculative decoding with this smaller Gemma 3 as draft (GGUF, MLX or HF folder, repo "
                             "id; e.g. the 270M for a 12B): same output, fewer big-model steps.")(fn)


def _speculation(draft_model, prompt_lookup, tokenizer, dtype, widen, num_draft_tokens=None) -> dict:
    """The speculative arguments (of stream_generate, ChatSession, Engine) for the --draft-model/--prompt-lookup
    options, the draft loaded here, once (a vocabulary that differs is a DraftError: one 'Error: ...' line)."""
    if draft_model is not None and prompt_lookup:
        raise click.UsageError("give --draft-model or --prompt-lookup, not both")
    if num_draft_tokens is not None and draft_model is None and not prompt_lookup:
        raise click.UsageError("--num-draft-tokens needs --draft-model or --prompt-lookup")
    if draft_model is None:
        return {"prompt_lookup": prompt_lookup}
    from . import load_draft

    return {"draft_model": load_draft(draft_model, tokenizer, dtype=dtype, widen=widen)}


def _constraint(json_schema, json_object, regex, grammar_file):
    """The compiled constraint of the --json-schema/--json/--regex/--grammar options (None without one); a bad
    one raises ConstraintError (a ValueError: one 'Error: ...' line). Cheap: done before the model loads."""
    import json
    from pathlib import Path

    from .constrain import ConstraintError, compile_constraint

    given = [name for name, v in (("--json-schema", json_schema), ("--json", json_object or None), ("--regex", regex),
                                  ("--grammar", grammar_file)) if v is not None]
    if len(given) > 1:
        raise ConstraintError(f"give one constraint, not {' and '.join(given)}")
    if json_schema is not None and not json_schema.lstrip().startswith(("{", "[")):
        path = Path(json_schema).expanduser()
        if path.is_file():
            json_schema = _read_text(path, "--json-schema")
        else:
            try:
                json.loads(json_schema)  # other JSON text (true, 3): compile_constraint says what is wrong with it
            except ValueError:
                raise ConstraintError(f"--json-schema {json_schema}: no such file, and not JSON text") from None
    grammar = None
    if grammar_file is not None:
        path = Path(grammar_file).expanduser()
        if not path.is_file():
            raise ConstraintError(f"--grammar {grammar_file}: no such file")
        grammar = _read_text(path, "--grammar")
    return compile_constraint(json_schema=json_schema, json=json_object, regex=regex, grammar=grammar)


def _read_text(path, option: str) -> str:
    from .constrain import MAX_CONSTRAINT_CHARS, ConstraintError

    if path.stat().st_size > 4 * MAX_CONSTRAINT_CHARS:
        raise ConstraintError(f"{option} {path}: {path.stat().st_size:,} bytes, too large")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConstraintError(f"{option} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _shard_options(fn):
    fn = click.option("--pipeline-split", default="auto", show_default=True, metavar="auto|N,N,...",
                      help="With --shard pipeline: layers per process, rank 0's first (auto: in proportion to the "
                           "memory each machine reports).")(fn)
    return click.option(
        "--shard", type=click.Choice(["tensor", "pipeline"]), default=None,
        help="Split the model over the processes mlx.launch started: tensor (query heads, MLP columns and the "
             "vocabulary split: about 1/N of the weights each) or pipeline (a range of layers each). E.g. "
             "mlx.launch --hosts mac1,mac2 --backend ring -- mlx-gemma generate --shard tensor ...; only rank 0 "
             "prints and reads input.")(fn)


@dataclass
class _Split:
    """The --shard options of one command: how the model loads and who talks to the user."""

    shard: str | None
    pipeline_split: list[int] | None
    world: object = None  # world.World under --shard

    @property
    def front(self) -> bool:
        """This process prints and reads input (rank 0; the only one without --shard)."""
        return self.world is None or self.world.rank == 0

    def echo(self, *args, **kwargs) -> None:
        if self.front:
            click.echo(*args, **kwargs)

    def share(self, text: str | None) -> str:
        """Rank 0's text (a prompt, a chat line) on every rank."""
        return text if self.world is None else self.world.text(text)

    def refuse_standard_input(self) -> None:
        """mlx.launch hands rank 0 its input but never its end, so a read to the end would wait forever."""
        if self.world is not None and self.world.size > 1:
            raise self.world.stopping(
                ValueError('under mlx.launch standard input never ends: give the prompt as --prompt "$(cat FILE)"'))

    def share_images(self, sources) -> list:
        """The images (paths, URLs) as rank 0 reads them, on every rank: the other hosts need not hold the files.
        One that rank 0 cannot read is the same ValueError on every rank."""
        if self.world is None or not sources:
            return list(sources or [])
        import numpy as np

        from .image import open_image

        arrays, error = [], None
        if self.front:
            try:
                arrays = [np.asarray(open_image(src), np.uint8) for src in sources]
            except (ValueError, OSError) as e:
                error = str(e) or type(e).__name__
        head = json.loads(self.share(json.dumps({"error": error, "shapes": [a.shape for a in arrays]})))
        if head["error"] is not None:  # every rank stops here alike; rank 0 says why
            raise self.world.stopping(ValueError(head["error"]))
        return [self.world.array(arrays[i] if self.front else np.zeros(shape, np.uint8))
                for i, shape in enumerate(head["shapes"])]

    def weights_line(self, active_after_load: int, layers: tuple[int, ...] | None) -> str | None:
        """The weight memory of every rank (MLX active memory after load) and, in a pipeline, its layer counts,
        for --stats (collective)."""
        if self.world is None or self.world.size == 1:
            return None
        per = self.world.values(active_after_load / 2**20)
        counts = f"; layers {', '.join(map(str, layers))}" if layers else ""
        return (f"Weights per rank ({self.shard} parallel over {len(per)} processes{counts}): "
                + ", ".join(f"{v:.1f}" for v in per) + " MiB")


def _split_options(shard, pipeline_split, *, draft_model=None, prompt_cache=None, prompt_lookup=False,
                   adapter_path=None) -> _Split:
    if shard is None:
        return _Split(None, None)
    refused = [name for name, v in (("--draft-model", draft_model), ("--prompt-cache", prompt_cache),
                                    ("--prompt-lookup", prompt_lookup or None), ("--adapter-path", adapter_path))
               if v is not None]
    if refused:
        raise click.UsageError(f"{' and '.join(refused)} cannot be used with --shard yet")
    counts = None
    if pipeline_split != "auto":
        if shard != "pipeline":
            raise click.UsageError("--pipeline-split goes with --shard pipeline")
        try:
            counts = [int(c) for c in pipeline_split.split(",")]
        except ValueError:
            raise click.UsageError(f"--pipeline-split {pipeline_split}: give auto or layer counts (6,12)") from None
    from .world import World

    world = World()
    world.say_when_stopped()
    return _Split(shard, counts, world)


def _adapter_option(fn):
    return click.option("--adapter-path", type=click.Path(file_okay=False), default=None,
                        help="Run with a LoRA adapter folder made by `mlx-gemma lora` (checked against the model).")(fn)


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


def _sampling_options(f):
    """--temp, --top-p, --top-k, --min-p: unset ones take the model's default sampling (an Ollama model's params),
    else off (greedy)."""
    for opt, kind, what in reversed([("--temp", float, "Temperature (0: greedy)"), ("--top-p", float, "top_p (0: off)"),
                                     ("--top-k", int, "top_k (0: off)"), ("--min-p", float, "min_p (0: off)")]):
        f = click.option(opt, type=kind, default=None, help=f"{what}; default: the model's default sampling "
                                                            "(an Ollama model's params), else 0.")(f)
    return f


@main.command()
@click.option("--model", "-m", default=None, help="MLX folder, GGUF file, HF folder or repo id (default: embedded Gemma 3 270M).")
@click.option("--mmproj", default=None, type=click.Path(),
              help="With a text GGUF --model: llama.cpp's vision GGUF (mmproj), to read --image.")
@click.option("--prompt", "-p", required=True, help="Prompt text ('-' reads standard input).")
@click.option("--max-tokens", "-n", type=int, default=256, show_default=True)
@_sampling_options
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
@_constraint_options
@_speculative_options
@_widen_option
@_scales_option
@_adapter_option
@_shard_options
@_clean_errors
def generate(model, mmproj, prompt, max_tokens, temp, top_p, top_k, min_p, seed, chat, system, images, pan_and_scan,
             dtype, prefill_step, kv_bits, kv_group_size, prompt_cache, stats, json_schema, json_object, regex,
             grammar_file, draft_model, num_draft_tokens, prompt_lookup, widen, scales, adapter_path, shard,
             pipeline_split):
    """Generate text, streaming tokens as they come."""
    import mlx.core as mx

    from . import load
    from .generate import base_model_note, format_stats, stream_generate
    from .sampling import choose_sampling

    split = _split_options(shard, pipeline_split, draft_model=draft_model, prompt_cache=prompt_cache,
                           prompt_lookup=prompt_lookup, adapter_path=adapter_path)
    constraint = _constraint(json_schema, json_object, regex, grammar_file)
    if prompt == "-":
        split.refuse_standard_input()
        prompt = sys.stdin.read()
    m, tok = load(model, mmproj=mmproj, dtype=dtype, widen=widen, scales=scales, adapter_path=adapter_path,
                  shard=split.shard, pipeline_split=split.pipeline_split)
    weights = split.weights_line(mx.get_active_memory(), m.shard and m.shard.layers) if stats else None
    sampling = choose_sampling(m, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    for note in (base_model_note(tok) if chat else None, sampling.note):
        if note:
            split.echo(f"Note: {note}", err=True)
    speculation = _speculation(draft_model, prompt_lookup, tok, dtype, widen, num_draft_tokens)
    last = None
    for last in stream_generate(m, tok, prompt, max_tokens, temp=sampling.temp, top_p=sampling.top_p,
                                top_k=sampling.top_k, min_p=sampling.min_p, stop_strings=list(sampling.stop) or None,
                                seed=seed, chat=chat, system=system, images=split.share_images(images) or None,
                                pan_and_scan=pan_and_scan, prefill_step_size=prefill_step, kv_bits=kv_bits,
                                kv_group_size=int(kv_group_size), prompt_cache=prompt_cache, constraint=constraint,
                                num_draft_tokens=num_draft_tokens, **speculation):
        split.echo(last.text, nl=False)
    split.echo()
    if stats and last is not None:
        split.echo("=" * 10, err=True)
        split.echo(format_stats(last) + (f"\n{weights}" if weights else ""), err=True)


@main.command()
@click.option("--model", "-m", default=None, help="MLX folder, GGUF file, HF folder or repo id (default: embedded Gemma 3 270M).")
@click.option("--mmproj", default=None, type=click.Path(), help="With a text GGUF --model: llama.cpp's vision GGUF.")
@click.option("--system", default=None, help="System prompt.")
@click.option("--image", "images", multiple=True, help="Image(s) for the first message (later: /image PATH).")
@click.option("--pan-and-scan", is_flag=True, help="Also show the model crops of elongated images.")
@click.option("--max-tokens", "-n", type=int, default=512, show_default=True, help="Most tokens per reply.")
@_sampling_options
@click.option("--seed", type=int, default=None)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Compute dtype (default: float32 on CPU, bfloat16 on GPU).")
@_kv_options
@click.option("--stats", is_flag=True, help="Print prompt/decode speed and cache use after each reply.")
@_constraint_options
@_speculative_options
@_widen_option
@_scales_option
@_adapter_option
@_shard_options
@_clean_errors
def chat(model, mmproj, system, images, pan_and_scan, max_tokens, temp, top_p, top_k, min_p, seed, dtype, kv_bits,
         kv_group_size, stats, json_schema, json_object, regex, grammar_file, draft_model, num_draft_tokens,
         prompt_lookup, widen, scales, adapter_path, shard, pipeline_split):
    """Chat in the terminal; the KV cache carries over between turns.

    Type a message and press Enter. Commands: /image PATH (attach to the next message), /reset, /quit.
    A constraint (--json-schema, --json, --regex, --grammar) applies to every reply.
    """
    from . import load
    from .chat import ChatSession
    from .generate import base_model_note, format_stats
    from .sampling import choose_sampling

    split = _split_options(shard, pipeline_split, draft_model=draft_model, prompt_lookup=prompt_lookup,
                           adapter_path=adapter_path)
    constraint = _constraint(json_schema, json_object, regex, grammar_file)
    m, tok = load(model, mmproj=mmproj, dtype=dtype, widen=widen, scales=scales, adapter_path=adapter_path,
                  shard=split.shard, pipeline_split=split.pipeline_split)
    sampling = choose_sampling(m, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    for note in (base_model_note(tok), sampling.note):
        if note:
            split.echo(f"Note: {note}", err=True)
    session = ChatSession(m, tok, system=system, pan_and_scan=pan_and_scan, kv_bits=kv_bits,
                          kv_group_size=int(kv_group_size), num_draft_tokens=num_draft_tokens,
                          **_speculation(draft_model, prompt_lookup, tok, dtype, widen, num_draft_tokens))
    pending = list(images)
    if seed is not None:
        import mlx.core as mx

        mx.random.seed(seed)
    split.echo("Chat with the model: /image PATH attaches an image, /reset starts over, /quit ends.", err=True)
    while True:
        line = "/quit"
        if split.front:
            try:
                line = click.prompt(">>", prompt_suffix=" ", default="", show_default=False, err=True)
            except click.exceptions.Abort:  # end of input (Ctrl-D) or Ctrl-C
                click.echo(err=True)
        text = split.share(line).strip()  # under --shard, every rank takes rank 0's line
        if text in ("/quit", "/exit", "/q"):
            break
        if text == "/reset":
            session.reset()
            pending = []
            split.echo("(conversation cleared)", err=True)
            continue
        if text.startswith("/image "):
            pending.append(text[len("/image "):].strip())
            continue
        if not text:
            continue
        try:
            last = None
            shown = split.share_images(pending)
            for last in session.send(text, shown, max_tokens, temp=sampling.temp, top_p=sampling.top_p,
                                     top_k=sampling.top_k, min_p=sampling.min_p,
                                     stop_strings=list(sampling.stop) or None, constraint=constraint):
                split.echo(last.text, nl=False)
            split.echo()
            pending = []
            if stats and last is not None:
                split.echo(format_stats(last) + f"\n(prompt tokens reused from the cache: {session.reused_tokens})",
                           err=True)
        except ValueError as e:  # a bad image, a full context: the session goes on without that message
            split.echo(f"Error: {e}", err=True)
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


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of the models, for scripts.")
@click.option("--all", "show_all", is_flag=True, help="Also list models of other architectures (not supported).")
@_clean_errors
def list_models(as_json, show_all):
    """Every Gemma 3 model found on this machine: our conversions, the Hugging Face cache, Ollama, LM Studio."""
    from .catalog import find_models

    found = find_models(include_unsupported=show_all)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in found], indent=1))
        return
    if not found:
        click.echo("no Gemma 3 models found (mlx-gemma pull NAME downloads and converts one)")
        return
    rows = [("NAME (-m)", "SOURCE", "SIZE", "TYPES", "VISION", "CONVERTED")]
    for e in found:
        types = ",".join(e.types) if e.supported else f"not supported: {e.architecture}"
        rows.append((e.name, e.source, _size(e.size), types, "yes" if e.vision else "no",
                     "yes" if e.converted else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


@main.command()
@click.argument("name")
@click.option("--mmproj", default=None, type=click.Path(), help="With a text GGUF: llama.cpp's vision GGUF.")
@_clean_errors
def pull(name, mmproj):
    """Download (from the hub) and convert NAME now, so that the first generate starts at once."""
    from .models_cache import resolve_model

    click.echo(f"{name} -> {resolve_model(name, mmproj=mmproj)}")


@main.command()
@click.argument("name")
@click.option("--mmproj", default=None, type=click.Path(), help="With a text GGUF: the vision GGUF it was pulled with.")
@_clean_errors
def rm(name, mmproj):
    """Remove our converted copy of NAME (never the file or folder it came from)."""
    from .models_cache import cached_conversion, remove_conversion

    folder = cached_conversion(name, mmproj=mmproj)
    if folder is None:
        raise click.ClickException(f"{name}: no converted copy in the cache")
    remove_conversion(folder)
    click.echo(f"removed {folder}")


@main.command()
@click.argument("path")
@click.option("--context", type=int, default=8192, show_default=True, help="Context length for the KV cache estimate.")
@click.option("--kv-bits", type=click.Choice(["4", "8"]), default=None,
              help="Show the KV cache at these bits (default: 8 and 4 beside float32 and bfloat16).")
@click.option("--kv-group-size", type=int, default=64, show_default=True, help="Group size of the quantized KV cache.")
@_scales_option
@_clean_errors
def inspect(path, context, kv_bits, kv_group_size, scales):
    """Show architecture, per-tensor precision, size on disk, memory once loaded and bytes read per decoded token
    of a GGUF file or MLX folder."""
    from .inspect import format_report, inspect_path

    click.echo(format_report(inspect_path(path), context, int(kv_bits) if kv_bits else None, kv_group_size,
                             scales))


def _rerun_with_resume() -> str | None:
    """This command line with --resume added, when this process runs as mlx-gemma (None under another program)."""
    from pathlib import Path

    argv0 = Path(sys.argv[0])
    if argv0.name not in ("mlx-gemma", "mlx-gemma.exe") and argv0.parts[-2:] != ("mlx_gemma_qat", "cli.py"):
        return None
    args = sys.argv[1:]
    return shlex.join(["mlx-gemma", *args, *([] if "--resume" in args else ["--resume"])])


@main.command()
@click.option("--model", "-m", default=None, help="MLX folder, GGUF file, HF folder or repo id (default: embedded Gemma 3 270M).")
@click.option("--data", required=True,
              help="Folder with train.jsonl and valid.jsonl (test.jsonl for --test), or a Hugging Face dataset id. "
                   "Records: {text}, {prompt, completion} or {messages} (chat; images as generate takes them).")
@click.option("--adapter-path", default="adapters", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the adapter, its checkpoints, metrics.jsonl and loss-curve.png.")
@click.option("--kind", type=click.Choice(["pooled", "lora"]), default="pooled", show_default=True,
              help="pooled: group-pooled (QA-LoRA), fuses exactly into the quantized layers' biases; "
                   "lora: standard LoRA (fusing re-rounds onto the layer's grid).")
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--scale", type=float, default=20.0, show_default=True, help="Multiplier of the adapter's update.")
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--num-layers", type=int, default=16, show_default=True, help="Adapt the last N blocks (-1: all).")
@click.option("--keys", default=None,
              help="Comma-separated linear layers to adapt in each block (e.g. q_proj,v_proj; default: all).")
@click.option("--adapt-embedding", is_flag=True, help="Adapt the tied embedding / output head too.")
@click.option("--iters", type=int, default=100, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per step (over all processes).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches accumulated per step.")
@click.option("--learning-rate", type=float, default=5e-5, show_default=True)
@click.option("--warmup", type=int, default=0, show_default=True, help="Linear warmup steps (then cosine decay).")
@click.option("--min-lr-ratio", type=float, default=0.0, show_default=True, help="Cosine end, as a fraction of the peak.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay.")
@click.option("--max-grad-norm", type=float, default=0.0, show_default=True, help="Clip the gradient norm (0: off).")
@click.option("--max-seq-length", type=int, default=2048, show_default=True, help="Longer sequences are cut (warned).")
@click.option("--mask-prompt/--no-mask-prompt", default=True, show_default=True,
              help="Loss on completions / assistant turns only.")
@click.option("--pack", is_flag=True, help="Pack sequences into full --max-seq-length rows (else batched by length).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--grad-checkpoint", is_flag=True, help="Recompute each block in the backward pass (less memory).")
@click.option("--val-every", type=int, default=50, show_default=True, help="Steps between validations.")
@click.option("--val-batches", type=int, default=25, show_default=True, help="Validation batches (-1: all).")
@click.option("--save-every", type=int, default=None,
              help="Steps between checkpoints (default: a tenth of --iters; 0: only at the end). Ctrl-C or an error "
                   "also saves the last completed step.")
@click.option("--report-every", type=int, default=10, show_default=True, help="Steps between metrics lines.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --adapter-path (bit-identical).")
@click.option("--allow-data-change", is_flag=True,
              help="With --resume: go on when the training data differ from the checkpoint's (else refused).")
@click.option("--test", is_flag=True, help="Report the loss on test.jsonl at the end.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Compute dtype (default: float32 on CPU, bfloat16 on GPU).")
@_widen_option
@_clean_errors
def lora(model, data, adapter_path, kind, rank, scale, dropout, num_layers, keys, adapt_embedding, iters, batch_size,
         grad_accum, learning_rate, warmup, min_lr_ratio, weight_decay, max_grad_norm, max_seq_length, mask_prompt, pack,
         seed, grad_checkpoint, val_every, val_batches, save_every, report_every, resume, allow_data_change, test, dtype,
         widen):
    """Fine-tune a LoRA adapter on the quantized model (base frozen, on this machine; mlx.launch for several)."""
    from .lora import PeerFailed, TrainingError, finetune

    adapter = dict(kind=kind, rank=rank, scale=scale, dropout=dropout, num_layers=num_layers,
                   keys=[k.strip() for k in keys.split(",") if k.strip()] if keys else None, embedding=adapt_embedding)
    train_cfg = dict(iters=iters, batch_size=batch_size, grad_accum=grad_accum, learning_rate=learning_rate,
                     warmup=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                     max_seq_length=max_seq_length, mask_prompt=mask_prompt, pack=pack, seed=seed,
                     grad_checkpoint=grad_checkpoint, val_every=val_every, val_batches=val_batches,
                     save_every=save_every, report_every=report_every)
    log = functools.partial(click.echo, err=True)
    try:
        r = finetune(model, data, adapter_path, adapter=adapter, train_config=train_cfg, resume=resume, dtype=dtype,
                     widen=widen, test=test, log=log, resume_command=_rerun_with_resume(),
                     allow_data_change=allow_data_change)
    except (TrainingError, PeerFailed) as e:
        raise click.ClickException(str(e)) from None
    parts = [f"{r.steps} steps", f"train loss {r.train_loss:.4f}"]
    if r.val_loss is not None:
        parts.append(f"validation loss {r.first_val_loss:.4f} -> {r.val_loss:.4f}" if r.first_val_loss is not None
                     else f"validation loss {r.val_loss:.4f}")
    if r.test_loss is not None:
        parts.append(f"test loss {r.test_loss:.4f}")
    parts += [f"{r.tokens_per_s:.1f} tokens/s", f"peak {r.peak_memory_gb:.2f} GB"]
    click.echo(", ".join(parts))
    click.echo(f"adapter: {r.adapter_path}")


@main.command()
@click.option("--model", "-m", default=None, help="MLX folder, GGUF file, HF folder or repo id (default: embedded Gemma 3 270M).")
@click.option("--adapter-path", required=True, type=click.Path(file_okay=False), help="Adapter folder (mlx-gemma lora).")
@click.option("--out", "-o", required=True, type=click.Path(), help="Fused MLX folder to write.")
@click.option("--gguf", "gguf_out", default=None, type=click.Path(dir_okay=False),
              help="Also export the fused model as a GGUF (llama.cpp / Ollama).")
@click.option("--base-gguf", default=None, type=click.Path(dir_okay=False),
              help="The base model's GGUF (tokenizer and metadata for --gguf; default: the one the model came from).")
@click.option("--data", default=None,
              help="Validation data (as for lora): report the loss with the adapter at run time and after fusing.")
@click.option("--val-batches", type=int, default=25, show_default=True, help="Validation batches for --data (-1: all).")
@click.option("--force", is_flag=True, help="Replace --out / --gguf if they exist.")
@_clean_errors
def fuse(model, adapter_path, out, gguf_out, base_gguf, data, val_batches, force):
    """Fuse an adapter into the model on its own quantization grid (group-pooled: exactly), optionally to GGUF."""
    from .lora.fuse import fuse as run
    from .models_cache import resolve_model

    folder = resolve_model(model)
    run(folder, adapter_path, out, force=force)
    click.echo(f"fused model: {out}")
    if data:
        from . import load
        from .lora import TrainConfig, datasets, evaluate

        cfg = TrainConfig(batch_size=1, max_seq_length=2048)
        before, tok = load(folder, adapter_path=adapter_path)
        valid = datasets(data, tok, cfg, model=before, splits=("valid",))["valid"]
        a = evaluate(before, valid, val_batches, cfg)
        del before
        after, _ = load(out)
        b = evaluate(after, valid, val_batches, cfg)
        click.echo(f"validation loss: adapter at run time {a:.5f}, fused {b:.5f} ({b - a:+.5f})")
    if gguf_out:
        from .convert.to_gguf import export_gguf

        export_gguf(out, gguf_out, base_gguf=base_gguf, force=force)
        click.echo(f"GGUF: {gguf_out}")


# ------------------------------------------------------------------------------------ quality measurements

def _text_options(fn):
    for opt in reversed([
        click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None,
                     help="Evaluation text: a text file (read verbatim, as llama-perplexity -f does), .jsonl/.json "
                          "records' --field, or .parquet."),
        click.option("--dataset", default=None, help="Or a Hugging Face dataset id (read from the local cache first)."),
        click.option("--split", default="test", show_default=True, help="Dataset split."),
        click.option("--config", "ds_config", default=None, help="Dataset configuration (e.g. wikitext-2-raw-v1)."),
        click.option("--field", default="text", show_default=True, help="Record field holding the text."),
    ]):
        fn = opt(fn)
    return fn


def _window_options(fn):
    for opt in reversed([
        click.option("--context", "-c", type=int, default=2048, show_default=True,
                     help="Window length in tokens (may exceed the sliding window; at most the model's context)."),
        click.option("--stride", type=int, default=None,
                     help="Overlapping windows every STRIDE tokens, every token scored once (default: llama.cpp's "
                          "non-overlapping windows, second half of each scored)."),
        click.option("--windows", "n_windows", type=int, default=None, help="Evaluate only the first N windows "
                     "(llama-perplexity --chunks)."),
        click.option("--chunk", type=int, default=256, show_default=True,
                     help="Tokens per forward pass through the KV cache."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
                     help="Compute dtype (default: float32 on CPU, bfloat16 on GPU)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]):
        fn = opt(fn)
    return fn


def _eval_tokens(tok, text_file, dataset, split, ds_config, field, context, stride, n_windows, required=True):
    """Token ids of the evaluation text, cut to --windows windows (None when no text is given and not required)."""
    from .evaluate.corpus import read_text, tokenize

    if text_file is None and dataset is None:
        if required:
            raise click.UsageError("give the evaluation text: --text FILE or --dataset REPO")
        return None
    text, _ = read_text(text_file, dataset=dataset, split=split, field=field, config=ds_config)
    ids = tokenize(tok, text)
    if n_windows is not None:
        if n_windows < 1:
            raise click.UsageError("--windows must be at least 1")
        s = context if stride is None else stride
        ids = ids[: (n_windows - 1) * s + context] if stride is not None else ids[: n_windows * context]
    return ids


def _emit(result, as_json):
    if as_json:
        import json

        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(result.format())


@main.command()
@click.option("--model", "-m", default=None, help="MLX folder, GGUF file, HF folder or repo id (default: embedded Gemma 3 270M).")
@_text_options
@_window_options
@_kv_options
@click.option("--save-logits", type=click.Path(dir_okay=False), default=None,
              help="Also save the scored log-probs as a KL-divergence reference (llama.cpp's --kl-divergence-base "
                   "format: 512 KiB per scored token at Gemma 3's vocabulary; see --logits-top-k).")
@click.option("--logits-top-k", type=int, default=0, show_default=True,
              help="Save only the top K log-probs per token (4 + 8K bytes; KLD from it is a lower bound). 0: all.")
@_widen_option
@_adapter_option
@_clean_errors
def perplexity(model, text_file, dataset, split, ds_config, field, context, stride, n_windows, chunk, dtype, as_json,
               quiet, kv_bits, kv_group_size, save_logits, logits_top_k, widen, adapter_path):
    """Perplexity of a model on a text, with its standard error (llama-perplexity's windows by default)."""
    from . import load
    from .evaluate.perplexity import perplexity as run

    m, tok = load(model, dtype=dtype, widen=widen, adapter_path=adapter_path)
    ids = _eval_tokens(tok, text_file, dataset, split, ds_config, field, context, stride, n_windows)
    r = run(m, ids, context=context, stride=stride, bos_id=tok.bos_token_id, chunk=chunk, kv_bits=kv_bits,
            kv_group_size=int(kv_group_size), save_logits=save_logits, logits_top_k=logits_top_k, progress=not quiet)
    _emit(r, as_json)


@main.command()
@click.option("--model", "-m", default=None, help="The model to measure (default: embedded Gemma 3 270M).")
@click.option("--ref", default=None, help="The reference model (both are held in memory).")
@click.option("--ref-logits", type=click.Path(dir_okay=False), default=None,
              help="Or a reference saved by `perplexity --save-logits` or llama-perplexity --kl-divergence-base "
                   "(its own tokens and windows; --text is then optional and must match).")
@_text_options
@_window_options
@_kv_options
@_widen_option
@_adapter_option
@_clean_errors
def kld(model, ref, ref_logits, text_file, dataset, split, ds_config, field, context, stride, n_windows, chunk, dtype,
        as_json, quiet, kv_bits, kv_group_size, widen, adapter_path):
    """KL divergence of a model against a reference on the same tokens (llama-perplexity's statistics)."""
    from . import load
    from .evaluate.kld import kl_divergence

    if (ref is None) == (ref_logits is None):
        raise click.UsageError("give --ref MODEL or --ref-logits FILE")
    m, tok = load(model, dtype=dtype, widen=widen, adapter_path=adapter_path)
    ids = _eval_tokens(tok, text_file, dataset, split, ds_config, field, context, stride, n_windows,
                       required=ref is not None)
    r_model = load(ref, dtype=dtype, widen=widen)[0] if ref is not None else None
    r = kl_divergence(m, ids, ref_model=r_model, ref_logits=ref_logits, context=context, stride=stride,
                      bos_id=tok.bos_token_id, chunk=chunk, kv_bits=kv_bits, kv_group_size=int(kv_group_size),
                      progress=not quiet, reference_name=ref or ref_logits, max_windows=n_windows)
    _emit(r, as_json)


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--ref", default=None, help="The reference model (e.g. the float checkpoint), scored first.")
@click.option("--ref-logits", type=click.Path(dir_okay=False), default=None, help="Or a saved reference logits file.")
@click.option("--save-ref-logits", type=click.Path(dir_okay=False), default=None,
              help="Keep the --ref model's logits file there, to reuse with --ref-logits.")
@_text_options
@_window_options
@click.option("--kv-bits", "kv_bits", type=click.IntRange(2, 8), multiple=True,
              help="Also run every model with its KV cache at these bits (repeatable: --kv-bits 8 --kv-bits 4).")
@click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--decode-tokens", type=int, default=32, show_default=True, help="Tokens generated to time decoding.")
@click.option("--logits-top-k", type=int, default=0, show_default=True,
              help="Keep only the reference's top K log-probs (smaller temporary file; KLD a lower bound).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: KLD distribution per model, perplexity vs bits per weight (needs matplotlib).")
@_widen_option
@_clean_errors
def compare(models, ref, ref_logits, save_ref_logits, text_file, dataset, split, ds_config, field, context, stride, n_windows, chunk,
            dtype, as_json, quiet, kv_bits, kv_group_size, decode_tokens, logits_top_k, plot_path, widen):
    """Compare MODELS (NAME=PATH to name a row) against one reference: bits per weight, memory, perplexity,
    KL divergence, same-top %, decode speed; one model in memory at a time."""
    from mlx_lm.utils import load_tokenizer

    from .evaluate.compare import compare as run
    from .evaluate.compare import format_table, parse_spec, plot
    from .models_cache import resolve_model

    if (ref is None) == (ref_logits is None):
        raise click.UsageError("give --ref MODEL or --ref-logits FILE")
    tok = load_tokenizer(resolve_model(parse_spec(ref or models[0])[1]))
    ids = _eval_tokens(tok, text_file, dataset, split, ds_config, field, context, stride, n_windows,
                       required=ref is not None)
    rows = run(list(models), ids, ref=ref, ref_logits=ref_logits, context=context, stride=stride,
               kv_bits=tuple(kv_bits), kv_group_size=int(kv_group_size), decode_tokens=decode_tokens,
               logits_top_k=logits_top_k, dtype=dtype, widen=widen, chunk=chunk, progress=not quiet,
               log=functools.partial(click.echo, err=True), save_ref_logits=save_ref_logits)
    if as_json:
        import json

        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        click.echo(format_table(rows))
    if plot_path and rows:
        plot(rows, plot_path)
        click.echo(f"plot: {plot_path}", err=True)

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _byte_size(ctx, param, value):
    """A size such as 2GB, 512MiB or 1000000 (bytes), as an int; None stays None."""
    if value is None:
        return None
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    unit = m and _SIZE_UNITS.get(m.group(2).lower())
    if not unit:
        raise click.BadParameter(f"{value!r} is not a size like 2GB, 512MiB or 1000000")
    return int(float(m.group(1)) * unit)


def _names(ctx, param, value) -> tuple[str, ...]:
    """A repeatable option whose values may also be comma-separated lists."""
    return tuple(v.strip() for item in value for v in item.split(",") if v.strip())


@main.command()
@click.option("--model", "-m", default=None, help="MLX folder, GGUF file, HF folder or repo id (default: embedded Gemma 3 270M).")
@click.option("--mmproj", default=None, type=click.Path(),
              help="With a text GGUF --model: llama.cpp's vision GGUF (mmproj), to read images.")
@_adapter_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 makes the server reachable from other machines).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--api-key", multiple=True, envvar="MLX_GEMMA_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every request; repeat for several clients' keys "
                   "(MLX_GEMMA_API_KEY, keys separated by spaces, keeps them out of ps).")
@click.option("--model-name", default=None,
              help="The model id clients use (default: the model's file or folder name; embedded: gemma3-270m).")
@_kv_options
@click.option("--prompt-cache-size", type=click.IntRange(min=0), default=8, show_default=True,
              help="Finished requests' KV caches kept for reuse by requests that extend them (0: none).")
@click.option("--prompt-cache-bytes", default=None, callback=_byte_size,
              help="Most memory the kept KV caches may hold, e.g. 2GB (default: an eighth of the device's memory).")
@click.option("--no-cross-client-reuse", is_flag=True,
              help="Reuse kept KV caches only among requests with the same API key (for shared servers: "
                   "cached_tokens otherwise tells a client that another sent the same prefix).")
@click.option("--reuse-slack", type=click.IntRange(min=0), default=64, show_default=True,
              help="Tokens sliding-window layers keep beyond the window, so a kept cache can be stepped back that far.")
@click.option("--parallel", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most requests generating at once (each holds a KV cache).")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Most requests waiting for a slot; more are answered 503 with Retry-After.")
@click.option("--max-body", default="20MB", show_default=True, callback=_byte_size,
              help="Largest request body (413 past it).")
@click.option("--max-images", type=click.IntRange(min=0), default=8, show_default=True,
              help="Most images in one request (400 past it).")
@click.option("--decode-batch", type=click.IntRange(min=1), default=None,
              help="Most requests decoded in one batched step (default: batched on a GPU, one by one on the CPU).")
@click.option("--prefill-step", type=click.IntRange(min=1), default=256, show_default=True, help="Tokens per prefill chunk.")
@click.option("--temp", type=float, default=None,
              help="Temperature for requests that give none (default: the model's default sampling, else 0).")
@click.option("--top-p", type=float, default=None, help="top_p for requests that give none (default: the model's, "
                                                         "else 1: off).")
@click.option("--top-k", type=int, default=None, help="top_k for requests that give none (default: the model's, "
                                                       "else 0: off).")
@click.option("--min-p", type=float, default=None, help="min_p for requests that give none (default: the model's, "
                                                         "else 0).")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=512, show_default=True,
              help="Most tokens per reply for requests that give no limit.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Compute dtype (default: float32 on CPU, bfloat16 on GPU).")
@_widen_option
@_scales_option
@click.option("--allow-image-urls", is_flag=True,
              help="Fetch images that requests give as http(s) URLs (off: only images sent in the request). "
                   "Public addresses only, within a time and size limit.")
@click.option("--allow-private-urls", is_flag=True,
              help="With --allow-image-urls: also fetch from loopback, private and link-local addresses.")
@click.option("--allowed-hosts", multiple=True, callback=_names, metavar="NAMES",
              help="Host names the server answers to besides IP addresses and localhost (repeatable or "
                   "comma-separated; '*': any). Refuses DNS-rebinding pages.")
@click.option("--cors-origin", multiple=True, callback=_names, metavar="ORIGINS",
              help="Web origins (e.g. http://localhost:3000) allowed to call the server from a browser; none by "
                   "default, '*': any.")
@_speculative_options
@_shard_options
@_clean_errors
def serve(model, mmproj, adapter_path, host, port, api_key, model_name, kv_bits, kv_group_size, prompt_cache_size,
          prompt_cache_bytes, no_cross_client_reuse, reuse_slack, parallel, max_queue, max_body, max_images,
          decode_batch, prefill_step, temp, top_p, top_k, min_p, max_tokens, dtype, widen, scales, allow_image_urls,
          allow_private_urls, allowed_hosts, cors_origin, draft_model, num_draft_tokens, prompt_lookup, shard,
          pipeline_split):
    """Serve the model over HTTP with OpenAI's API (/v1) and Ollama's (/api), many clients at once.

    With --shard (under mlx.launch), rank 0 serves and the other ranks run its requests' forwards in step."""
    from . import load
    from .models_cache import resolve_model
    from .server.app import ServerOptions, create_app, default_model_id, describe_model, run
    from .server.engine import Engine, SamplingParams

    if allow_private_urls and not allow_image_urls:
        raise click.UsageError("--allow-private-urls needs --allow-image-urls")
    fetch_policy = None
    if allow_image_urls:
        from dataclasses import replace

        from .fetch import SERVER_POLICY

        fetch_policy = replace(SERVER_POLICY, allow_private=allow_private_urls)
    options = ServerOptions(api_keys=api_key, max_body=max_body, max_images=max_images, bound_host=host,
                            allowed_hosts=allowed_hosts, cors_origins=cors_origin, fetch_policy=fetch_policy,
                            cross_client_reuse=not no_cross_client_reuse)
    from .sampling import Sampling, choose_sampling

    SamplingParams(max_tokens=max_tokens, temperature=temp or 0.0, top_p=1.0 if top_p is None else top_p,
                   top_k=top_k or 0, min_p=min_p or 0.0).check()  # the options, before the model loads
    split = _split_options(shard, pipeline_split, draft_model=draft_model, prompt_lookup=prompt_lookup,
                           adapter_path=adapter_path)
    if split.world is None:
        folder = resolve_model(model, mmproj=mmproj)
        m, tok = load(folder, dtype=dtype, widen=widen, scales=scales, adapter_path=adapter_path)
    else:  # every rank finds and loads its part; the engines must run alike: rank 0's batching everywhere
        m, tok = load(model, mmproj=mmproj, dtype=dtype, widen=widen, scales=scales, shard=split.shard,
                      pipeline_split=split.pipeline_split)
        folder = m.path
        if decode_batch is None:
            import mlx.core as mx

            decode_batch = 1 if mx.default_device() == mx.cpu else 8
        decode_batch = int(split.share(str(decode_batch)))
    chosen = choose_sampling(m, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, off=Sampling(top_p=1.0))
    defaults = SamplingParams(max_tokens=max_tokens, temperature=chosen.temp, top_p=chosen.top_p, top_k=chosen.top_k,
                              min_p=chosen.min_p, stop=chosen.stop)
    defaults.check()
    if chosen.note:
        split.echo(f"Note: {chosen.note}", err=True)
    engine_options = dict(kv_bits=kv_bits, kv_group_size=int(kv_group_size), cache_entries=prompt_cache_size,
                          cache_bytes=prompt_cache_bytes, slack=reuse_slack, decode_batch=decode_batch,
                          prefill_step=prefill_step, parallel=parallel, max_queue=max_queue,
                          num_draft_tokens=num_draft_tokens)
    if split.world is None:
        engine = Engine(m, tok, **engine_options,
                        **_speculation(draft_model, prompt_lookup, tok, dtype, widen, num_draft_tokens))
    else:
        from .server.split import FollowerEngine, FrontEngine

        if not split.front:
            FollowerEngine(m, tok, split.world, **engine_options).follow()  # until rank 0 stops
            return
        engine = FrontEngine(m, tok, split.world, **engine_options)
    card = describe_model(m, tok, folder, model_name or default_model_id(model))
    app = create_app(engine, card, defaults=defaults, options=options)
    where = f"[{host}]" if ":" in host else host
    spec = (f", speculative decoding with {'prompt lookup' if prompt_lookup else draft_model} "
            f"({engine.num_draft} draft tokens)" if engine.speculative else "")
    over = f", split over {split.world.size} processes ({split.shard} parallel)" if split.world is not None else ""
    click.echo(f"serving {card.id} on http://{where}:{port} (OpenAI API: /v1, Ollama API: /api){spec}{over}",
               err=True)
    run(app, host, port)


if __name__ == "__main__":
    main()
