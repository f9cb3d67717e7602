"""The model that writes and judges feature explanations: a local Hugging Face instruct model or an
OpenAI-compatible HTTP endpoint, behind two calls.

    generate(prompts, max_new_tokens) -> texts     greedy continuation of each chat prompt
    yes_probability(prompts) -> [P(Yes) / (P(Yes) + P(No))]   the next token's odds, read in one forward pass

A prompt is a chat: a list of {"role", "content"} messages. `yes_probability` is how the scorers ask their
one-word questions: reading the answer token's probabilities is deterministic and needs no parsing, and
with one example per prompt it is delphi's classifier with log-probabilities (answer 1 or 0) in Yes/No form.
The local model batches prompts and computes their shared token prefix (the instructions and the
explanation) once, reusing its KV cache for every prompt of the batch; suffixes are right-padded (a causal
model's real tokens never see the padding after them) and each prompt is read at its own last token, through
the two answers' rows of the output head only (with the final logit soft-capping of models that have one).
"""

from __future__ import annotations

import copy
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from saepipe.errors import UserError, field_error

Chat = list[dict[str, str]]
ANSWERS = ("Yes", "No")
MIN_SHARED_PREFIX = 8
"""Reuse a batch's shared prefix only when it is at least this many tokens."""


class Explainer(Protocol):
    name: str

    def generate(self, prompts: list[Chat], max_new_tokens: int) -> list[str]: ...

    def yes_probability(self, prompts: list[Chat]) -> np.ndarray: ...


def plain_chat(messages: Chat) -> str:
    """A chat as text for tokenizers without a chat template (e.g. the tests' tiny random model)."""
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


class LocalExplainer:
    """A causal LM from a local directory (or a hub id), greedy, in batches of `batch_size` prompts."""

    def __init__(self, model_path: str | Path, device: Any, batch_size: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = str(model_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as exc:
            raise field_error("interp.explainer_model", str(model_path),
                              f"a loadable causal LM directory or hub id ({str(exc).splitlines()[0]})") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device, self.batch_size = device, batch_size
        ids = [self.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS]
        if ids[0] == ids[1]:
            raise UserError(f"{model_path}: the tokenizer spells Yes and No with the same first token")
        self.answer_ids = ids

    def render(self, chat: Chat) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return plain_chat(chat)

    def encode(self, chat: Chat) -> list[int]:
        return self.tokenizer(self.render(chat), add_special_tokens=False)["input_ids"]

    def generate(self, prompts: list[Chat], max_new_tokens: int) -> list[str]:
        import torch

        out: list[str] = []
        self.tokenizer.padding_side = "left"  # generation continues every row from its last column
        for start in range(0, len(prompts), self.batch_size):
            texts = [self.render(p) for p in prompts[start : start + self.batch_size]]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                tokens = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                             pad_token_id=self.tokenizer.pad_token_id)
            new = tokens[:, batch["input_ids"].shape[1]:]
            out += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return out

    def yes_probability(self, prompts: list[Chat]) -> np.ndarray:
        out = [self.score_tokens([self.encode(p) for p in prompts[start : start + self.batch_size]])
               for start in range(0, len(prompts), self.batch_size)]
        return np.concatenate(out) if out else np.zeros(0)

    def score_tokens(self, ids: list[list[int]]) -> np.ndarray:
        """P(Yes) / (P(Yes) + P(No)) after each token sequence: the shared prefix once, then the suffixes."""
        import torch

        shared = shared_prefix(ids)
        shared = shared if shared >= MIN_SHARED_PREFIX else 0
        cache = None
        with torch.inference_mode():
            if shared:
                prefix = torch.tensor([ids[0][:shared]], device=self.device)
                cache = self.prefix_cache(prefix)
                cache.batch_repeat_interleave(len(ids))
            lengths = [len(x) - shared for x in ids]
            width = max(lengths)
            suffix = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(ids), shared + width), dtype=torch.long)
            for row, x in enumerate(ids):
                suffix[row, : lengths[row]] = torch.tensor(x[shared:])
                mask[row, : shared + lengths[row]] = 1
            hidden = self.model.base_model(input_ids=suffix.to(self.device), attention_mask=mask.to(self.device),
                                           cache=cache, use_cache=cache is not None).last_hidden_state
            last = hidden[torch.arange(len(ids)), torch.tensor(lengths) - 1]
            # only the last real token's logits, and only for the two answers: the vocabulary-wide head is skipped
            head = self.model.get_output_embeddings()
            logits = last @ head.weight[self.answer_ids].T
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias[self.answer_ids]
            cap = getattr(self.model.config, "final_logit_softcapping", None)
            if cap:
                logits = cap * torch.tanh(logits / cap)
            return torch.softmax(logits.float(), dim=-1)[:, 0].cpu().numpy().astype(np.float64)

    def prefix_cache(self, prefix: Any) -> Any:
        """The KV cache of `prefix`, computed once per distinct prefix (a copy: a forward extends it)."""
        key = tuple(prefix[0].tolist())
        if getattr(self, "_prefix_key", None) != key:
            self._prefix_key = key
            self._prefix = self.model.base_model(input_ids=prefix, use_cache=True)["cache"]
        return copy.deepcopy(self._prefix)


def shared_prefix(ids: list[list[int]]) -> int:
    """Length of the token prefix every sequence shares, leaving each at least one token of its own."""
    first = np.asarray(ids[0])
    n = min(len(x) for x in ids) - 1
    for x in ids[1:]:
        same = first[:n] == np.asarray(x[:n])
        n = int(np.argmin(same)) if not same.all() else n
    return max(n, 0)


class HTTPExplainer:
    """An OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp's server, a hosted API)."""

    def __init__(self, url: str, model: str | None, api_key_env: str | None, timeout: float = 120.0):
        self.given = url
        """The URL as the params spell it: what an error names."""
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.name = f"{model or 'default'} at {url}"
        self.model = model or "default"
        self._key = None
        if api_key_env is not None:
            self._key = os.environ.get(api_key_env)
            if not self._key:
                raise field_error("interp.explainer_api_key_env", api_key_env, "an environment variable that is set "
                                  "(it holds the endpoint's API key)")
        self.timeout = timeout

    def __repr__(self) -> str:  # never show the key
        return f"HTTPExplainer({self.url!r}, model={self.model!r})"

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise field_error("interp.explainer_url", self.given, f"an endpoint that answers (HTTP {exc.code} "
                              f"{exc.reason})") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise field_error("interp.explainer_url", self.given, f"a reachable endpoint ({reason})") from None
        except json.JSONDecodeError:
            raise field_error("interp.explainer_url", self.given, "an endpoint that answers with JSON") from None

    def _complete(self, chat: Chat, max_tokens: int, **extra: Any) -> dict[str, Any]:
        body = {"model": self.model, "messages": chat, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0,
                **extra}
        reply = self._post(body)
        try:
            return reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise field_error("interp.explainer_url", self.given, "a chat-completions reply with choices") from None

    def check(self) -> None:
        """One one-token question, so that an unreachable endpoint, a wrong key or an unknown model is refused
        before the stage does any work."""
        self._complete([{"role": "user", "content": "Answer with one word: Yes."}], 1)

    def generate(self, prompts: list[Chat], max_new_tokens: int) -> list[str]:
        return [self._complete(chat, max_new_tokens)["message"]["content"] or "" for chat in prompts]

    def yes_probability(self, prompts: list[Chat]) -> np.ndarray:
        return np.array([self._answer(self._complete(chat, 1, logprobs=True, top_logprobs=5)) for chat in prompts])

    @staticmethod
    def _answer(choice: dict[str, Any]) -> float:
        """P(Yes) / (P(Yes) + P(No)) from the first token's top log-probabilities, else from the text."""
        content = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") or []
        p = dict.fromkeys(ANSWERS, 0.0)
        for entry in content:
            word = str(entry.get("token", "")).strip().capitalize()
            if word in p:
                p[word] += float(np.exp(entry.get("logprob", -np.inf)))
        if p["Yes"] + p["No"] > 0:
            return p["Yes"] / (p["Yes"] + p["No"])
        text = str((choice.get("message") or {}).get("content") or "").strip().capitalize()
        return 1.0 if text.startswith("Yes") else 0.0 if text.startswith("No") else 0.5
