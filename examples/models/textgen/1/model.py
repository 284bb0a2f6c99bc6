"""textgen: a word-level n-gram language model that streams its output.

Training happens in ``__init__``: the corpus file shipped next to this module
(parameter ``corpus``, default ``corpus.txt``) is split into tokens, and for
every context of 1 to ``order - 1`` preceding tokens the model counts which
token came next. That is the whole model; it takes a few milliseconds.

Tokens. A token is a word (letters and digits, with inner hyphens or
apostrophes, e.g. ``half-precision``) or one punctuation mark out of
``. , ; : ! ?``. Contexts are matched case-insensitively. Each streamed TOKEN
is the token's text with the space that belongs before it, so
``prompt + "".join(tokens)`` reads as running text: words get a leading space
(unless the text so far is empty or already ends in whitespace), punctuation
gets none. A word after ``.``, ``!`` or ``?`` is capitalised; otherwise a
word is spelled the way the corpus usually spells it mid-sentence (``GPU``).

Generation. The next token is drawn from the counts that follow the longest
context (at most ``order - 1`` tokens) seen in the corpus, backing off to
shorter contexts and finally to the unigram distribution when the recent
tokens were never seen together. Counts are sharpened by ``temperature``
(weights = count ** (1 / temperature); ``0`` means greedy). The random
generator is seeded from a SHA-256 of the prompt bytes and the ``seed``
parameter, so the same prompt always gives the same stream, and a shorter
MAX_TOKENS gives a prefix of a longer one.

Tensors. PROMPT: BYTES [1] (UTF-8). MAX_TOKENS: INT32 [1], optional, default
parameter ``default_max_tokens`` (32), at most ``max_tokens_limit``.
Output: TOKEN: BYTES [1], one response per token, exactly MAX_TOKENS of them.
"""

from __future__ import annotations

import collections
import hashlib
import pathlib
import re
from collections.abc import Iterator

import numpy as np

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*|[.,;:!?]")
_PUNCTUATION = frozenset(".,;:!?")
_SENTENCE_END = frozenset(".!?")


def tokenize(text: str) -> list[str]:
    """Surface tokens of ``text`` in order (anything else is dropped)."""
    return _TOKEN.findall(text)


class Predictor:
    def __init__(self, config: dict):
        params = dict(config.get("parameters") or {})
        self.name = config.get("name", "textgen")
        model_dir = pathlib.Path(config["model_dir"]).resolve()

        self.order = int(params.get("order", "4"))
        if self.order < 1:
            raise ValueError(f"{self.name}: parameter order must be >= 1, got {self.order}")
        self.temperature = float(params.get("temperature", "0.8"))
        if self.temperature < 0:
            raise ValueError(f"{self.name}: parameter temperature must be >= 0")
        self.default_max_tokens = int(params.get("default_max_tokens", "32"))
        self.max_tokens_limit = int(params.get("max_tokens_limit", "512"))
        self.seed = params.get("seed", "0")

        corpus_path = (model_dir / params.get("corpus", "corpus.txt")).resolve()
        if model_dir not in corpus_path.parents:
            raise ValueError(f"{self.name}: corpus must be a file inside {model_dir}")
        surface = tokenize(corpus_path.read_text(encoding="utf-8"))
        if not surface:
            raise ValueError(f"{self.name}: corpus {corpus_path} has no tokens")
        tokens = [t.lower() for t in surface]
        self.vocabulary = frozenset(tokens)
        self._spelling = self._spellings(surface)

        # tables[k]: context of k tokens -> (candidate tokens, their counts).
        # tables[0] has the single empty context: the unigram distribution.
        self._tables: list[dict[tuple[str, ...], tuple[list[str], np.ndarray]]] = []
        for k in range(self.order):
            counts: dict[tuple[str, ...], collections.Counter] = collections.defaultdict(
                collections.Counter
            )
            for i in range(k, len(tokens)):
                counts[tuple(tokens[i - k : i])][tokens[i]] += 1
            table = {}
            for context, counter in counts.items():
                candidates = sorted(counter)
                table[context] = (
                    candidates,
                    np.array([counter[c] for c in candidates], dtype=np.float64),
                )
            self._tables.append(table)

    @staticmethod
    def _spellings(surface: list[str]) -> dict[str, str]:
        """How each token is usually written when it is not starting a sentence."""
        forms: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        previous = "."
        for token in surface:
            if previous not in _SENTENCE_END:
                forms[token.lower()][token] += 1
            previous = token
        return {
            low: min(counter, key=lambda form: (-counter[form], form != low, form))
            for low, counter in forms.items()
        }

    # -- inputs -------------------------------------------------------------

    def _prompt(self, array) -> str:
        values = np.asarray(array, dtype=object).reshape(-1)
        if values.size != 1:
            raise ValueError(f"{self.name}: PROMPT must hold exactly one element, got {values.size}")
        value = values[0]
        if isinstance(value, str):
            return value
        return bytes(value).decode("utf-8", errors="replace")

    def _max_tokens(self, array) -> int:
        if array is None:
            return self.default_max_tokens
        values = np.asarray(array).reshape(-1)
        if values.size != 1:
            raise ValueError(f"{self.name}: MAX_TOKENS must hold exactly one element, got {values.size}")
        count = int(values[0])
        if count < 0:
            raise ValueError(f"{self.name}: MAX_TOKENS must be >= 0, got {count}")
        if count > self.max_tokens_limit:
            raise ValueError(
                f"{self.name}: MAX_TOKENS {count} is above the limit of {self.max_tokens_limit}"
            )
        return count

    # -- generation ---------------------------------------------------------

    def _rng(self, prompt: str) -> np.random.Generator:
        digest = hashlib.sha256(f"{self.seed}\0{prompt}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:16], "little"))

    def next_token(self, history: list[str], rng: np.random.Generator) -> str:
        """Sample the token after ``history`` (lower-case tokens), backing off as needed."""
        for k in range(min(self.order - 1, len(history)), -1, -1):
            entry = self._tables[k].get(tuple(history[len(history) - k :]))
            if entry is not None:
                break
        candidates, counts = entry
        if self.temperature == 0:
            return candidates[int(np.argmax(counts))]
        weights = counts ** (1.0 / self.temperature)
        cumulative = np.cumsum(weights)
        pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        return candidates[min(pick, len(candidates) - 1)]

    def generate(self, prompt: str, max_tokens: int) -> Iterator[str]:
        """The text pieces that continue ``prompt``, one per token."""
        rng = self._rng(prompt)
        history = [t.lower() for t in tokenize(prompt)]
        text_so_far_ends_blank = prompt == "" or prompt[-1].isspace()
        for _ in range(max_tokens):
            token = self.next_token(history, rng)
            if token in _PUNCTUATION:
                piece = token
            else:
                word = self._spelling.get(token, token)
                if not history or history[-1] in _SENTENCE_END:
                    word = word[:1].upper() + word[1:]
                piece = word if text_so_far_ends_blank else " " + word
            history.append(token)
            text_so_far_ends_blank = False
            yield piece

    def predict(self, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        prompt = self._prompt(inputs["PROMPT"])
        max_tokens = self._max_tokens(inputs.get("MAX_TOKENS"))
        for piece in self.generate(prompt, max_tokens):
            yield {"TOKEN": np.array([piece.encode("utf-8")], dtype=object)}
