"""Chat with a model in the terminal, streaming each reply.

    python examples/chat.py                              # the bundled demo model, raw chat log
    python examples/chat.py -m /models/Llama-3-8B-exl2 -mode llama3
    python examples/chat.py --prompt "What does json.dumps do?" --max-new-tokens 64
    echo "What is os.path?" | python examples/chat.py     # stdin that is not a terminal: one prompt

Interactive: type a message and press Enter; "clear" forgets the conversation; Ctrl-C stops the
reply being written and, at the prompt, the line being typed (never the program); Ctrl-D quits.
Non-interactive (--prompt, or piped stdin): each prompt is one turn and only the replies go to
stdout; the options and the attention plan go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))       # chat_prompts

import torch  # noqa: E402

from chat_prompts import PromptFormat, prompt_formats, render_conversation  # noqa: E402
from exllamav2 import model_init  # noqa: E402
from exllamav2.errors import GenerationArgumentError, UsageError, did_you_mean  # noqa: E402

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model" / "fp16"

COL_DEFAULT, COL_USER, COL_BOT, COL_ERROR, COL_DIM = "\x1b[0m", "\x1b[33;1m", "\x1b[34;1m", "\x1b[31;1m", "\x1b[37;2m"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with an EXL2/GPTQ/FP16 model (ExLlamaV2)")
    model_init.add_args(parser)
    parser.set_defaults(model_dir=str(DEMO_MODEL_DIR))

    parser.add_argument("-modes", "--modes", action="store_true", help="List the prompt formats and exit")
    parser.add_argument("-mode", "--mode", metavar="{" + ",".join(sorted(prompt_formats)) + "}",
                        help="Prompt format (default: raw for the demo model; required otherwise)")
    parser.add_argument("-un", "--username", type=str, default="User", help="User name (raw mode)")
    parser.add_argument("-bn", "--botname", type=str, default="Chatbort", help="Bot name (raw mode)")
    parser.add_argument("-sp", "--system_prompt", type=str, help="Use a custom system prompt")
    parser.add_argument("-nsp", "--no_system_prompt", action="store_true", help="Do not use any system prompt")

    parser.add_argument("-temp", "--temperature", type=float, default=0.95, help="Sampler temperature")
    parser.add_argument("-topk", "--top_k", type=int, default=50, help="Sampler top-K (1: greedy)")
    parser.add_argument("-topp", "--top_p", type=float, default=0.8, help="Sampler top-P (0: off)")
    parser.add_argument("-minp", "--min_p", type=float, default=0.0, help="Sampler min-P (0: off)")
    parser.add_argument("-repp", "--repetition_penalty", type=float, default=1.01, help="Sampler repetition penalty")

    parser.add_argument("-maxr", "--max_response_tokens", type=int, default=1000, help="Max tokens per reply")
    parser.add_argument("-resc", "--response_chunk", type=int, default=250,
                        help="Context kept free for the reply before old turns are dropped")
    parser.add_argument("-amnesia", "--amnesia", action="store_true", help="Forget every earlier turn")
    parser.add_argument("-pt", "--print_timings", action="store_true", help="Print timings after each reply")

    parser.add_argument("-c8", "--cache_8bit", action="store_true", help="8-bit (FP8) cache")
    parser.add_argument("-cq4", "--cache_q4", action="store_true", help="Q4 cache")
    parser.add_argument("-cq6", "--cache_q6", action="store_true", help="Q6 cache")
    parser.add_argument("-cq8", "--cache_q8", action="store_true", help="Q8 cache")

    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="Non-interactive: reply to TEXT and exit (repeat for more turns)")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, metavar="N",
                        help="Max tokens per reply (overrides -maxr)")
    args = parser.parse_args(argv)
    if args.modes:
        return args
    # The model directory first: a wrong -m is the mistake to fix, not the -mode that the demo model
    # does not need.
    model_init.check_args(args)
    try:
        check_chat_args(args)
    except UsageError as e:      # one line, not argparse's usage dump; status 2 as for any usage error
        if args.debug:
            raise
        parser.exit(2, f" ## Error: {e}\n")
    return args


# sampler setting -> the flag that sets it, so errors name what the user typed
SAMPLER_FLAGS = {"temperature": "-temp", "top_k": "-topk", "top_p": "-topp", "min_p": "-minp",
                 "token_repetition_penalty": "-repp"}


def check_chat_args(args: argparse.Namespace) -> None:
    """Raise UsageError for options that cannot work, before the model loads; fills in the demo's -mode."""
    from exllamav2.inputs import check_sampler_settings

    if args.mode is not None and args.mode not in prompt_formats:
        raise UsageError(f"-mode {args.mode} is not a prompt format{did_you_mean(args.mode, sorted(prompt_formats))}; "
                     f"-modes lists them")
    if args.mode is None:
        if Path(args.model_dir).resolve().parent == DEMO_MODEL_DIR.parent.resolve():   # fp16/ or exl2/
            args.mode = "raw"
        else:
            raise UsageError("-mode is required for a model other than the demo model; -modes lists the formats")
    if sum([args.cache_8bit, args.cache_q4, args.cache_q6, args.cache_q8]) > 1:
        raise UsageError("choose at most one of -c8, -cq4, -cq6, -cq8")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    for flag, value in (("-maxr", args.max_response_tokens), ("-resc", args.response_chunk)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    try:
        check_sampler_settings(sampler_settings(args))
    except GenerationArgumentError as e:     # in the flags' words: "-temp -1.0 is out of range ..."
        message = str(e)
        for attr, flag in SAMPLER_FLAGS.items():
            message = message.replace(f"sampler setting {attr} = ", f"{flag} ")
        raise UsageError(message)


def cache_class(args: argparse.Namespace) -> type:
    import exllamav2

    for flag, name in (("cache_8bit", "ExLlamaV2Cache_8bit"), ("cache_q4", "ExLlamaV2Cache_Q4"),
                       ("cache_q6", "ExLlamaV2Cache_Q6"), ("cache_q8", "ExLlamaV2Cache_Q8")):
        if getattr(args, flag):
            return getattr(exllamav2, name)
    return exllamav2.ExLlamaV2Cache


def sampler_settings(args: argparse.Namespace):
    from exllamav2.generator import ExLlamaV2Sampler

    settings = ExLlamaV2Sampler.Settings()
    settings.temperature = args.temperature
    settings.top_k = args.top_k
    settings.top_p = args.top_p
    settings.min_p = args.min_p
    settings.token_repetition_penalty = args.repetition_penalty
    return settings


class Conversation:
    """The turns so far, rendered and tokenized into a context that fits the cache."""

    def __init__(self, fmt: PromptFormat, tokenizer, system_prompt: str | None, amnesia: bool) -> None:
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.amnesia = amnesia
        self.user_prompts: list[str] = []
        self.responses: list[str] = []

    def clear(self) -> None:
        self.user_prompts.clear()
        self.responses.clear()

    def add_user(self, text: str) -> None:
        if self.amnesia:
            self.clear()
        self.user_prompts.append(text)

    def context_ids(self, max_len: int, partial_response: str = "") -> torch.Tensor:
        """Token ids (1, n) of the conversation, dropping the oldest turns until n < max_len."""
        add_bos, add_eos, special = self.fmt.encoding_options()
        while True:
            responses = self.responses + ([partial_response] if partial_response else [])
            text = render_conversation(self.fmt, self.user_prompts, responses, self.system_prompt)
            ids = self.tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos, encode_special_tokens=special)
            if ids.shape[-1] < max_len or len(self.user_prompts) <= 1:
                # A single turn too long for the cache keeps its most recent tokens.
                return ids[:, -(max_len - 1):] if ids.shape[-1] >= max_len else ids
            self.user_prompts.pop(0)
            self.responses.pop(0)


@contextlib.contextmanager
def ctrl_c_sets(event: threading.Event) -> Iterator[None]:
    """While active, Ctrl-C sets `event` (the reply stops at the next token) instead of raising."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Chat:
    def __init__(self, args: argparse.Namespace, model, cache, tokenizer, out: TextIO, info: TextIO,
                 color: bool) -> None:
        from exllamav2.generator import ExLlamaV2StreamingGenerator

        self.args = args
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        self.out = out
        self.info = info
        self.color = color
        self.fmt = prompt_formats[args.mode]()
        self.fmt.username = args.username
        self.fmt.botname = args.botname
        if args.no_system_prompt:
            system_prompt = None
        else:
            system_prompt = args.system_prompt if args.system_prompt is not None else self.fmt.default_system_prompt()
        self.conversation = Conversation(self.fmt, tokenizer, system_prompt, args.amnesia)
        self.generator = ExLlamaV2StreamingGenerator(model, cache, tokenizer)
        self.generator.set_stop_conditions(self.fmt.stop_conditions(tokenizer))
        self.settings = sampler_settings(args)
        max_seq_len = cache.max_seq_len
        self.max_new_tokens = args.max_new_tokens or args.max_response_tokens
        # Keep room for the reply, but never more than half the context.
        self.reserve = max(1, min(args.response_chunk, self.max_new_tokens, max_seq_len // 2))

    def paint(self, text: str, col: str) -> str:
        return f"{col}{text}{COL_DEFAULT}" if self.color else text

    def reply(self, user_text: str, show_name: bool) -> str:
        """Stream the model's reply to `user_text`; returns the reply (partial if interrupted)."""
        self.conversation.add_user(user_text)
        max_ctx = self.cache.max_seq_len - self.reserve
        stop = threading.Event()
        if show_name and self.fmt.print_bot_name():
            self.out.write(self.paint(f"{self.fmt.botname}: ", COL_BOT))
            self.out.flush()

        text, pending, n_tokens = "", "", 0
        started = time.perf_counter()
        with ctrl_c_sets(stop):
            context = self.conversation.context_ids(max_ctx)
            n_context = context.shape[-1]
            self.generator.begin_stream_ex(context, self.settings, abort_event=stop)
            prefilled = time.perf_counter()
            while n_tokens < self.max_new_tokens and not stop.is_set():
                if self.generator.full():
                    # Cache full: drop old turns, keep the reply so far, and carry on.
                    context = self.conversation.context_ids(max_ctx, text.strip())
                    self.generator.begin_stream_ex(context, self.settings, abort_event=stop)
                result = self.generator.stream_ex()
                n_tokens += result["chunk_token_ids"].shape[-1]
                # Leading whitespace is the format's response_prefix; trailing whitespace is held
                # until more text follows, so a reply never ends in the newline before a stop string.
                pending = (pending + result["chunk"]).lstrip() if not text else pending + result["chunk"]
                shown = pending.rstrip()
                pending = pending[len(shown):]
                text += shown
                self.out.write(shown)
                self.out.flush()
                if result["eos"]:
                    break
        finished = time.perf_counter()

        if stop.is_set():
            self.out.write(self.paint(" [stopped]", COL_DIM))
        self.out.write("\n")
        if show_name and self.fmt.print_extra_newline():
            self.out.write("\n")
        self.out.flush()
        reply = text.strip()
        self.conversation.responses.append(reply)
        if self.args.print_timings:
            decode_s = max(finished - prefilled, 1e-9)
            self.info.write(self.paint(
                f"(context: {n_context} tokens, prefill {prefilled - started:.2f} s; response: "
                f"{n_tokens} tokens, {n_tokens / decode_s:.2f} tokens/s)\n", COL_DIM))
            self.info.flush()
        return reply

    def interactive(self) -> None:
        self.info.write(self.paint(
            'Ctrl-C stops a reply; Ctrl-D quits; "clear" forgets the conversation.\n\n', COL_DIM))
        while True:
            try:
                user_text = input(self.paint(f"{self.fmt.username}: ", COL_USER))
            except KeyboardInterrupt:       # like a shell: drop the line, keep the program
                self.out.write("\n")
                continue
            except EOFError:
                self.out.write("\n")
                return
            if not user_text.strip():
                continue
            if user_text.strip() == "clear":
                self.conversation.clear()
                self.info.write(self.paint("(conversation cleared)\n", COL_DIM))
                continue
            self.out.write("\n")
            self.reply(user_text, show_name=True)


def load(args: argparse.Namespace):
    model_init.print_options(args)
    model, tokenizer = model_init.init(args, allow_auto_split=True, skip_load=True, max_output_len=16)
    print(model.attn_plan.describe())
    model_init.post_init_load(model, args, allow_auto_split=True)
    cache = cache_class(args)(model, lazy=not model.loaded)
    if not model.loaded:
        model.load_autosplit(cache, progress=True)
    return model, cache, tokenizer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Bad input anywhere (model files, flags, variables) is one " ## Error:" line; -v shows the traceback.
    with model_init.one_line_errors(args):
        return run(args)


def run(args: argparse.Namespace) -> int:
    if args.modes:
        print("Available prompt formats:")
        for name in sorted(prompt_formats):
            print(f"  {name:<10} {prompt_formats[name].description}")
        return 0

    prompts = args.prompt
    if prompts is None and not sys.stdin.isatty():
        piped = sys.stdin.read().strip()
        if not piped:
            print("chat.py: stdin is not a terminal but held no prompt; pass --prompt TEXT", file=sys.stderr)
            return 2
        prompts = [piped]
    interactive = prompts is None

    # Non-interactive runs keep stdout for the replies alone.
    info = sys.stdout if interactive else sys.stderr
    with contextlib.redirect_stdout(info):
        model, cache, tokenizer = load(args)
    color = interactive and sys.stdout.isatty()
    chat = Chat(args, model, cache, tokenizer, out=sys.stdout, info=info, color=color)
    if interactive:
        chat.interactive()
    else:
        for text in prompts:
            chat.reply(text, show_name=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
