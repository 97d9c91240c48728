"""The `llamaexport` command: a thin layer over the Python API."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import click

from llamaexport import LlamaExportError, __version__
from llamaexport.build.recipe import INT4_RECIPES, KV_CACHE_CHOICES, PRECISIONS, QUANT_METHOD_CHOICES
from llamaexport.model.chat import FORMATS as CHAT_FORMATS


class _Group(click.Group):
    """Turns user errors into one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LlamaExportError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except MemoryError:
            click.echo("error: out of memory; use a smaller model, precision or --max-seq-len", err=True)
            sys.exit(1)
        except OSError as e:
            if e.errno == errno.ENOMEM:
                click.echo("error: out of memory; use a smaller model, precision or --max-seq-len", err=True)
            else:
                where = f" ({e.filename})" if e.filename else ""
                click.echo(f"error: {e.strerror or e}{where}; check the path and free disk space", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


BACKEND = click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]),
                       help="Run with this backend instead of the manifest's (onnxruntime runs any artifact's ONNX).")


CHAT_FORMAT = click.option(
    "--chat-format", help=f"{', '.join(CHAT_FORMATS)}. Default: the one recorded at build (build --chat-format), "
                          "else auto (the model's own template).")


def _logit_bias(ctx, param, values) -> dict[int, float] | None:
    """--logit-bias ID=BIAS (repeatable) as {id: bias}; SamplingConfig checks the ranges, the model the ids."""
    bias = {}
    for v in values:
        token_id, _, value = v.partition("=")
        try:
            bias[int(token_id)] = float(value)
        except ValueError:
            raise click.BadParameter(f"{v!r}: give ID=BIAS, e.g. --logit-bias 2=-100 (a token id, a bias from -100 "
                                     "to 100)") from None
    return bias or None


def SAMPLING(f):
    """The sampling options of `run` and `chat` (llamaexport.runtime.sampling.SamplingConfig's fields)."""
    for option in reversed([
            click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
            click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
            click.option("--top-p", type=float, default=1.0, show_default=True),
            click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
            click.option("--seed", type=int, default=None),
            click.option("--logit-bias", multiple=True, callback=_logit_bias, metavar="ID=BIAS",
                         help="Add BIAS (-100 .. 100) to token ID's logit before sampling (repeatable; -100 bans it).")]):
        f = option(f)
    return f


def SPECULATIVE(f):
    """The speculative decoding options of `run`, `chat`, `serve` and `bench` (runtime.speculative)."""
    for option in reversed([
            click.option("--speculative", type=click.Choice(["ngram", "draft", "off"]), default="off",
                         show_default=True, help="Draft several tokens per forward and verify them (lossless): "
                         "ngram = prompt lookup (pays when the answer copies its input), draft = --draft DIR."),
            click.option("--draft", type=click.Path(), help="A smaller artifact with the same tokenizer that drafts "
                         "for this one (implies --speculative draft)."),
            click.option("--spec-k", type=int, help="Most tokens drafted per forward (default 4)."),
            click.option("--spec-ngram", type=int, default=3, show_default=True,
                         help="Longest suffix prompt lookup matches (down to 1 token).")]):
        f = option(f)
    return f


def _speculation(speculative, draft, spec_k, spec_ngram):
    """The Speculation the options ask for, or None (off)."""
    from llamaexport.runtime.speculative import DEFAULT_NGRAM_MIN, Speculation

    if draft and speculative == "off":
        speculative = "draft"
    if speculative == "off":
        if spec_k is not None:
            raise LlamaExportError("--spec-k needs --speculative ngram or draft")
        return None
    if speculative == "ngram" and draft:
        raise LlamaExportError("--draft goes with --speculative draft, not ngram")
    return Speculation(speculative, spec_k, spec_ngram, min(DEFAULT_NGRAM_MIN, spec_ngram), draft)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llamaexport")
def main():
    """Compile LLaMA-family models into fast ONNX Runtime and TensorRT artifacts."""


@main.command()
@click.option("--size", help="A named size with seeded random weights (7B, 13B, llama3-8B, tiny, ...).")
@click.option("--checkpoint", type=click.Path(), help="A Meta or HF checkpoint directory, or a .gguf file.")
@click.option("--profile", default="cpu", show_default=True, help="Hardware profile name or .toml path.")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(["auto", *PRECISIONS]))
@click.option("--tokenizer", type=click.Path(), help="tokenizer.model / tokenizer.json (default: next to the weights).")
@click.option("--max-seq-len", type=int, help="Context length (default: the profile's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --size random weights.")
@click.option("--out", required=True, type=click.Path(), help="Artifact directory to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--export-only", is_flag=True, help="TensorRT profiles: stop before the engine (compile on the target).")
@click.option("--block-size", type=int, help="int4/int8 quantization block along K, for every quantized tensor. "
                                                "Default: 4-bit tensors and the CPU output layer 32 (the CPU compact int4 "
                                                "recipe: 64), the CPU graph's 8-bit layer projections 128.")
@click.option("--memory-gb", type=float, help="Override the profile's device memory (GiB).")
@click.option("--quant-method", default="auto", show_default=True, type=click.Choice(QUANT_METHOD_CHOICES),
              help="int8/int4: rtn (round-to-nearest), awq (AWQ scales, importance-weighted rounding) or gptq (AWQ "
                   "scales, then GPTQ rounding: slower build); auto, when a tokenizer gives calibration text: gptq "
                   "for compact int4, else awq; without one rtn. w8a8 always calibrates (SmoothQuant).")
@click.option("--int4-recipe", default="accurate", show_default=True, type=click.Choice(INT4_RECIPES),
              help="int4: accurate keeps QKV/down (and the CPU output layer) at 8 bits; compact quantizes every "
                   "linear and the output layer to 4 bits: the fewest bytes and fastest decode, less accurate.")
@click.option("--calibration", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Text file(s) to calibrate AWQ / SmoothQuant on (default: the text shipped with llamaexport).")
@click.option("--chat-format", help="Record the model's chat format in the manifest (run --chat, chat and serve "
                                    f"use it when not given one): {', '.join(CHAT_FORMATS)}. Default: auto.")
@click.option("--lora", multiple=True, type=click.Path(),
              help="A PEFT LoRA adapter directory to merge into the weights (repeatable: applied in order).")
@click.option("--kv-cache", default="auto", show_default=True, type=click.Choice(KV_CACHE_CHOICES),
              help="GPU profiles: inplace (a max-length cache updated in place, fused Attention: TensorRT >= 10.15) "
                   "or concat (every TensorRT 10.x, JetPack 6); auto: inplace when the TensorRT building the engine "
                   "(with --export-only: the profile's tensorrt_version) is >= 10.15.")
@click.option("--check", "run_check", is_flag=True, help="Run the parity check after building.")
def build(size, checkpoint, profile, precision, tokenizer, max_seq_len, seed, out, force, export_only, block_size,
          memory_gb, quant_method, int4_recipe, calibration, chat_format, lora, kv_cache, run_check):
    """Build an artifact directory from a checkpoint or a size."""
    from llamaexport.build.pipeline import build as do_build

    if (size is None) == (checkpoint is None):
        raise LlamaExportError("give exactly one of --checkpoint PATH or --size S")
    path = do_build(out=out, checkpoint=checkpoint, size=size, profile=profile, precision=precision,
                    tokenizer=tokenizer, max_seq_len=max_seq_len, seed=seed, force=force,
                    export_only=export_only, block_size=block_size, memory_gb=memory_gb,
                    quant_method=quant_method, int4_recipe=int4_recipe,
                    calibration_files=list(calibration) or None, chat_format=chat_format, lora=list(lora),
                    kv_cache=kv_cache)
    if run_check:
        _check(path, None, False)


def CONSTRAINT(f):
    """run's and chat's --json-schema / --grammar / --regex."""
    for opt in reversed([
            click.option("--json-schema", "json_schema", type=click.Path(exists=True, dir_okay=False),
                         help="Answer with JSON that follows this JSON Schema file (strict: undeclared keys refused; "
                              "needs the structured extra)."),
            click.option("--grammar", type=click.Path(exists=True, dir_okay=False),
                         help="Answer in the language of this grammar file (GBNF, or Lark; needs the structured extra)."),
            click.option("--regex", help="Answer with text matching this regular expression (needs the structured extra).")]):
        f = opt(f)
    return f


def _compile(spec, model, json_schema):
    """The compiled grammar of a _constraint_spec for this model (None for None); errors name the option."""
    if spec is None:
        return None
    from llamaexport.runtime.constraint import BadConstraint, compile_constraint
    param = spec.pop("param")
    try:
        return compile_constraint(spec, model.require_tokenizer(), n_vocab=model.config.vocab_size, param=param)
    except BadConstraint as e:  # "--json-schema.json_schema.schema at /x: ..." -> "--json-schema FILE at /x: ..."
        raise LlamaExportError(str(e).replace(f"{param}.json_schema.schema", f"--json-schema {json_schema}")) from None


def _constraint_spec(json_schema, grammar, regex) -> dict | None:
    """run's --json-schema FILE / --grammar FILE / --regex RE as a runtime.constraint spec (at most one),
    with "param" naming the option for the error of a bad one."""
    given = [name for name, v in (("--json-schema", json_schema), ("--grammar", grammar), ("--regex", regex)) if v]
    if len(given) > 1:
        raise LlamaExportError(f"give at most one of --json-schema, --grammar and --regex (got {', '.join(given)})")
    if json_schema:
        try:
            schema = json.loads(Path(json_schema).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LlamaExportError(f"--json-schema {json_schema}: not a JSON file ({e})") from None
        return {"type": "json_schema", "json_schema": {"schema": schema, "strict": True}, "param": "--json-schema"}
    if grammar:
        return {"type": "gbnf", "gbnf": Path(grammar).read_text(encoding="utf-8"), "param": "--grammar"}
    if regex:
        return {"type": "regex", "regex": regex, "param": "--regex"}
    return None


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", required=True, help="The prompt text.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@SAMPLING
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--chat", is_flag=True, help="Format the prompt as a chat turn.")
@CHAT_FORMAT
@click.option("--system", help="System prompt for --chat.")
@CONSTRAINT
@SPECULATIVE
@click.option("--threads", type=int, help="CPU threads (default: the profile's, recorded at build; all available).")
@BACKEND
def run(artifact, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, logit_bias, stop, chat,
        chat_format, system, json_schema, grammar, regex, speculative, draft, spec_k, spec_ngram, threads, backend):
    """Generate text, streaming it to stdout."""
    from llamaexport.runtime.llama_model import LlamaModel
    from llamaexport.runtime.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed, logit_bias=logit_bias)
    spec = _constraint_spec(json_schema, grammar, regex)
    speculation = _speculation(speculative, draft, spec_k, spec_ngram)
    model = LlamaModel.load(artifact, threads=threads, backend=backend)
    constraint = _compile(spec, model, json_schema)
    if speculation is not None and speculation.method == "draft":
        from llamaexport.runtime.speculative import load_draft
        speculation.draft = load_draft(speculation.draft, model)
    for piece in model.stream(prompt, max_new_tokens=max_new_tokens, sampling=sampling, stop=list(stop),
                              chat=((chat_format or True) if chat else False), system=system, constraint=constraint,
                              speculative=speculation):
        click.echo(piece, nl=False)
    click.echo()


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-batch", type=int, default=4, show_default=True, help="Sequences decoded together (KV slots).")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Requests that may wait for a slot; beyond that the server answers 429.")
@click.option("--prefill-chunk", type=int, default=128, show_default=True,
              help="Prompt tokens per prefill forward while others decode (bounds their stall).")
@click.option("--threads", type=int, help="CPU threads (default: the profile's, recorded at build; all available).")
@click.option("--api-key", envvar="LLAMAEXPORT_API_KEY", help="Require 'Authorization: Bearer KEY' (env LLAMAEXPORT_API_KEY).")
@CHAT_FORMAT
@click.option("--model-name", help="The model id clients send (default: the artifact directory's name).")
@SPECULATIVE
@BACKEND
def serve(artifact, host, port, max_batch, max_queue, prefill_chunk, threads, api_key, chat_format, model_name,
          speculative, draft, spec_k, spec_ngram, backend):
    """Serve an artifact over the OpenAI API (continuous batching; needs the serve extra). --speculative is the
    requests' default (a request's "speculative" field overrides it); it runs while one request decodes."""
    from llamaexport.serving.server import serve as run_server

    run_server(artifact, host=host, port=port, max_batch=max_batch, max_queue=max_queue, threads=threads,
               api_key=api_key, prefill_chunk=prefill_chunk, chat_format=chat_format, model_name=model_name,
               backend=backend, speculative=_speculation(speculative, draft, spec_k, spec_ngram))


@main.command("chat")
@click.argument("artifact", type=click.Path())
@click.option("--system", help="System prompt.")
@CHAT_FORMAT
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Longest answer.")
@SAMPLING
@CONSTRAINT
@SPECULATIVE
@click.option("--threads", type=int, help="CPU threads (default: the profile's, recorded at build; all available).")
@BACKEND
def chat_cmd(artifact, system, chat_format, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
             logit_bias, json_schema, grammar, regex, speculative, draft, spec_k, spec_ngram, threads, backend):
    """Chat with an artifact in the terminal (multi-turn; /help lists the commands)."""
    from llamaexport.runtime.completion import check_generation
    from llamaexport.runtime.llama_model import LlamaModel
    from llamaexport.runtime.sampling import SamplingConfig
    from llamaexport.serving import repl

    check_generation(max_new_tokens=max_new_tokens)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed, logit_bias=logit_bias)
    spec = _constraint_spec(json_schema, grammar, regex)
    speculation = _speculation(speculative, draft, spec_k, spec_ngram)
    with LlamaModel.load(artifact, threads=threads, backend=backend) as model:
        model.require_tokenizer()
        sampling.check_vocab(model.config.vocab_size)
        repl.main(model, fmt=chat_format, system=system, sampling=sampling, max_new_tokens=max_new_tokens,
                  grammar=_compile(spec, model, json_schema), speculative=speculation)


def _check(artifact, reference, as_json, backend=None, layerwise=False):
    if layerwise:
        from llamaexport.verify.layerwise import format_layerwise
        from llamaexport.verify.layerwise import layerwise as check
        format_report = format_layerwise
    else:
        from llamaexport.verify.parity import check, format_report

    report = check(artifact, reference=reference, progress=not as_json, backend=backend)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["passed"]:
        sys.exit(2)


@main.command("check")
@click.argument("artifact", type=click.Path())
@click.option("--reference", type=click.Path(), help="Reference checkpoint (default: the one in the manifest).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--layerwise", is_flag=True,
              help="Compare every decoder layer's outputs instead, and name the first layer and op over the budget.")
@BACKEND
def check_cmd(artifact, reference, as_json, layerwise, backend):
    """Compare an artifact with the eager PyTorch reference; exit 2 on a miss."""
    _check(artifact, reference, as_json, backend, layerwise)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt-len", type=int, default=64, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--threads", type=int, help="CPU threads (default: the profile's, recorded at build; all available).")
@click.option("--repeat", type=int, default=3, show_default=True, help="Runs; the median is reported.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False),
              help="A UTF-8 text sent as one chat turn (raw without a chat format) instead of --prompt-len random ids "
                   "(speculation needs real text).")
@SPECULATIVE
@BACKEND
def bench(artifact, prompt_len, new_tokens, batch, threads, repeat, as_json, prompt_file, speculative, draft, spec_k,
          spec_ngram, backend):
    """Prefill and decode tokens/s and peak memory (with --speculative: acceptance and tokens per forward)."""
    from llamaexport.verify.bench import format_bench, run_bench

    r = run_bench(artifact, prompt_len=prompt_len, new_tokens=new_tokens, batch=batch, threads=threads,
                  repeat=repeat, backend=backend, prompt_file=prompt_file,
                  speculative=_speculation(speculative, draft, spec_k, spec_ngram))
    click.echo(json.dumps(r) if as_json else format_bench(r))


@main.command("eval")
@click.argument("artifact", type=click.Path())
@click.option("--text", "text_file", required=True, type=click.Path(), help="UTF-8 text file to score.")
@click.option("--ctx", type=int, help="Window length in tokens (default: 512, or the artifact's context if smaller; "
                                      "with --base-logits the base's).")
@click.option("--stride", type=int, help="llama.cpp's --ppl-stride: windows of ctx + stride/2 every stride tokens, "
                                         "each scoring its last stride tokens (default: llama.cpp's chunks).")
@click.option("--chunks", type=int, help="Score only the first N windows (llama.cpp's --chunks).")
@click.option("--save-logits", type=click.Path(), help="Write this run's top-32 log-probs to FILE (.npz) as a base.")
@click.option("--base-logits", type=click.Path(), help="Compare with a base run's --save-logits FILE: KL, same top, Δppl.")
@click.option("--threads", type=int, help="CPU threads (default: the profile's, recorded at build; all available).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@BACKEND
def eval_cmd(artifact, text_file, ctx, stride, chunks, save_logits, base_logits, threads, as_json, backend):
    """Perplexity over a text as llama.cpp's llama-perplexity scores it; KL against a base run."""
    from llamaexport.verify.eval import evaluate, format_report

    r = evaluate(artifact, text_file, ctx=ctx, stride=stride, chunks=chunks, save_logits=save_logits,
                 base_logits=base_logits, backend=backend, threads=threads)
    click.echo(json.dumps(r, indent=2) if as_json else format_report(r))


@main.command()
@click.option("--size", help="A named size (7B, 13B, llama3-8B, ...).")
@click.option("--checkpoint", type=click.Path(), help="A checkpoint (only its config is read).")
@click.option("--profile", default="cpu", show_default=True)
@click.option("--max-seq-len", type=int, help="Context length (default: the profile's, capped by the model's).")
@click.option("--batch", type=int, help="Batch size (default: the profile's).")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(["auto", *PRECISIONS]))
@click.option("--memory-gb", type=float, help="Override the profile's device memory (GiB).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (every term, the budget, the choice).")
def plan(size, checkpoint, profile, max_seq_len, batch, precision, memory_gb, as_json):
    """Memory plan per precision on a profile, the choice, and the decode ceiling."""
    from llamaexport.build.planner import choose, format_plans, plan_all, plans_json
    from llamaexport.build.profiles import load_profile
    from llamaexport.build.recipe import Recipe
    from llamaexport.model.checkpoint import load_checkpoint

    if (size is None) == (checkpoint is None):
        raise LlamaExportError("give exactly one of --checkpoint PATH or --size S")
    prof = load_profile(profile, memory_gb=memory_gb)
    recipes = Recipe.candidates(prof, precision)
    cfg = load_checkpoint(checkpoint, size=size).config
    ctx = min(cfg.max_seq_len, prof.default_context) if max_seq_len is None else max_seq_len
    b = prof.default_batch if batch is None else batch
    plans = plan_all(cfg, prof, context=ctx, batch=b)
    if as_json:
        try:
            chosen, error = choose(cfg, prof, recipes, context=ctx, batch=b), None
        except LlamaExportError as e:
            chosen, error = None, str(e)
        click.echo(json.dumps(plans_json(cfg, prof, plans, chosen, context=ctx, batch=b, error=error), indent=2))
        if error:
            raise LlamaExportError(error)
        return
    click.echo(format_plans(cfg, prof, plans, None, context=ctx, batch=b).rsplit("\n", 1)[0])
    chosen = choose(cfg, prof, recipes, context=ctx, batch=b)  # raises with the numbers if nothing fits
    click.echo(f"choice: {chosen.label} ({chosen.total / 2**30:.2f} GiB of {chosen.budget / 2**30:.1f} GiB, "
               f"decode ceiling {chosen.decode_ceiling:.1f} tok/s)")


@main.command()
@click.argument("artifact", type=click.Path())
def inspect(artifact):
    """Show what an artifact's manifest says."""
    from llamaexport.artifact.inspect import format_manifest
    from llamaexport.artifact.manifest import read_manifest

    click.echo(format_manifest(read_manifest(artifact)))


@main.command()
@click.argument("artifact", type=click.Path())
def verify(artifact):
    """Compare every file of an artifact with the checksums its build recorded."""
    from llamaexport.artifact.manifest import damage_message, damaged_files, read_manifest

    m = read_manifest(artifact)
    if not m.get("checksums"):
        raise LlamaExportError(f"{artifact} records no checksums (built by an older llamaexport); rebuild it to verify it")
    problems = damaged_files(artifact, m)
    for line in problems:
        click.echo(f"DAMAGED  {line}")
    if problems:
        raise LlamaExportError(damage_message(artifact, problems))
    click.echo(f"ok: {len(m['checksums'])} files match the build's sha256")


@main.command()
def profiles():
    """List the bundled hardware profiles."""
    from llamaexport.build.profiles import load_profile, profile_names

    rows = [("name", "backend", "memory", "bandwidth", "precisions", "context")]
    for n in profile_names():
        p = load_profile(n)
        mem = f"{p.memory_gb:g} GB" + (" shared" if p.shared_memory else "")
        rows.append((n, p.backend, mem, f"{p.memory_bandwidth_gbs:g} GB/s", ",".join(p.precisions), str(p.default_context)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@main.command("compile")
@click.argument("artifact", type=click.Path())
@click.option("--profile", help="TensorRT hardware profile name or .toml path (default: the artifact's).")
@click.option("--force", is_flag=True, help="Rebuild the engine if the artifact already has one.")
def compile_cmd(artifact, profile, force):
    """Build the TensorRT engine of an --export-only artifact, in place."""
    from llamaexport.build.pipeline import compile_artifact

    eng = compile_artifact(artifact, profile=profile, force=force)
    click.echo(f"compiled {artifact}/{eng['file']} (TensorRT {eng['tensorrt']}, {eng['build_seconds']}s)")


@main.group()
def plugins():
    """The TensorRT plugin library (RoPE, SwiGLU)."""


@plugins.command("build")
@click.option("--tensorrt-root", type=click.Path(exists=True, file_okay=False),
              help="TensorRT install prefix holding include/NvInfer.h (default: the headers in $TensorRT_ROOT or "
                   "/usr/include whose major version is the installed tensorrt package's).")
@click.option("--cuda-arch", help="CUDA architectures, e.g. 89 or 80,86,89 (default: this machine's GPUs).")
@click.option("--kernels-only", is_flag=True, help="Build only the CUDA kernels and their tests (no TensorRT).")
def plugins_build(tensorrt_root, cuda_arch, kernels_only):
    """cmake-build plugins/ into build/plugins (libllamaexport_plugins.so)."""
    from llamaexport.tensorrt.plugins import build_plugins

    out = build_plugins(tensorrt_root=tensorrt_root, cuda_arch=cuda_arch, kernels_only=kernels_only)
    click.echo(f"built {out}")


MODEL_COMMANDS = ("run", "bench", "check", "eval", "serve", "chat")  # the ones that load an artifact to run it


def entry():
    """The console script: commands that run a model first re-exec with huge pages (hugepages.py)."""
    if len(sys.argv) > 1 and sys.argv[1] in MODEL_COMMANDS:
        from llamaexport.runtime.hugepages import reexec_with_huge_pages
        reexec_with_huge_pages()
    main(prog_name="llamaexport")


if __name__ == "__main__":
    entry()
