"""Converters from the real data of the six task kinds into lemb query and key records.

Each function reads one source (paths are arguments; nothing here knows where the data lives) and
returns `(queries, keys)`: dicts with exactly the fields of `schemas.QUERY` and `schemas.KEY`,
in a deterministic order, with ids prefixed by the source so that several sources can be mixed.
The layouts handled are those described in each source folder's SOURCES.md.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from lemb.data.readers import iter_jsonl
from lemb.errors import InputError

log = logging.getLogger(__name__)

Records = tuple[list[dict[str, Any]], list[dict[str, Any]]]


def _query(
    qid: str,
    task: str,
    text: str,
    target: str | None = None,
    positive_ids: list[str] | None = None,
    history: list[str] | None = None,
    relevance: dict[str, int] | None = None,
) -> dict[str, Any]:
    return {
        "query_id": qid,
        "task": task,
        "text": text,
        "target": target,
        "positive_ids": list(positive_ids or []),
        "history": list(history or []),
        "relevance": relevance,
    }


def _key(kid: str, task: str, text: str, title: str | None = None) -> dict[str, Any]:
    return {"key_id": kid, "task": task, "text": text, "title": title}


class _Record(dict):
    """A JSON object that knows where it was read: a missing field names the file, the line and the field."""

    def __init__(self, items: Any, path: Path, where: str) -> None:
        super().__init__(items)
        self.path, self.where = path, where

    def __missing__(self, field: str) -> Any:
        raise InputError(self.path, self.where, field, "missing")


def _loads(text: str, path: Path, where: str) -> Any:
    try:
        return json.loads(text, object_hook=lambda obj: _Record(obj, path, where))
    except json.JSONDecodeError as exc:
        raise InputError(path, where, None, f"not valid JSON ({exc.msg})") from None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file, read by lemb's own reader: a bad line names the file and the line."""
    return [record for _, record in iter_jsonl(path, lambda obj, where: _Record(obj, path, where))]


def _json(path: Path) -> Any:
    if not path.exists():
        raise InputError(path, "file", None, "not found")
    return _loads(path.read_text(encoding="utf-8"), path, "file")


# ---------------------------------------------------------------- 1. knowledge QA


def knowledge_qa_nq_oracle(folder: str | Path, limit: int | None = None) -> Records:
    """NQ-open questions with their gold Wikipedia passage (knowledge_qa/nq_oracle, or its parent).

    Keys are the 2,600 passages; queries the 1,615 questions (the first `limit` of them). The schema
    holds one desired output, so `target` is the first listed answer: 727 questions list more than
    one acceptable answer, and those aliases are dropped here (answer-set evaluation must go back to
    queries.jsonl).
    """
    folder = Path(folder)
    if (folder / "nq_oracle").is_dir():
        folder = folder / "nq_oracle"
    keys = [_key(f"nq-{p['id']}", "qa", p["text"], p.get("title") or None) for p in _jsonl(folder / "corpus.jsonl")]
    rows = _jsonl(folder / "queries.jsonl")[:limit]
    queries = [
        _query(
            f"nq-{q['id']}",
            "qa",
            q["question"],
            q["answers"][0] if q["answers"] else None,
            [f"nq-{p}" for p in q["positive_ids"]],
        )
        for q in rows
    ]
    return queries, keys


# ---------------------------------------------------------------- 2. in-context examples

# Label words as in the Calibrate-Before-Use prompts (the files' own source): a short natural word is
# what an LLM can produce as the desired output; TREC's HUM is "person" for the same reason.
_TREC_WORDS = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "person",
    "LOC": "location",
    "NUM": "number",
}
_NLI_WORDS = {"entailment": "true", "contradiction": "false", "neutral": "neither", "not_entailment": "false"}
_ICL_SPLITS = {"sst2": ("train", "dev"), "trec": ("train", "test"), "cb": ("train", "val"), "rte": ("train", "val")}


def _labelled_lines(path: Path, word: dict[str, str], coarse: bool = False) -> list[tuple[str, str]]:
    """(text, label word) of each "LABEL text" line (`coarse`: the label's part before ":" is looked up)."""
    if not path.exists():
        raise InputError(path, "file", None, "not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            label, _, text = line.partition(" ")
            label = label.split(":")[0] if coarse else label
            if label not in word or not text.strip():
                raise InputError(path, f"line {n}", "label", f"expected 'LABEL text' with LABEL in {sorted(word)}")
            out.append((text.strip(), word[label]))
    return out


def _icl_rows(folder: Path, dataset: str, split: str) -> list[tuple[str, str]]:
    """(input, label word) pairs of one split; the input carries the task's question, as the toy icl.json does."""
    if dataset == "sst2":
        rows = _labelled_lines(folder / "sst2" / f"stsa.binary.{split}", {"1": "positive", "0": "negative"})
        return [(f"{text}\nIs the sentiment of this review positive or negative?", label) for text, label in rows]
    if dataset == "trec":
        rows = _labelled_lines(folder / "trec" / f"{split}.txt", _TREC_WORDS, coarse=True)
        return [(f"{text}\nWhat kind of answer does this question ask for?", label) for text, label in rows]
    if dataset in ("cb", "rte"):
        path = folder / dataset / f"{split}.jsonl"
        choices = "True, false, or neither?" if dataset == "cb" else "True or false?"
        # The hypothesis rarely ends with punctuation, so the choices go on their own line.
        out = []
        for n, r in enumerate(_jsonl(path), start=1):
            if r.get("label") is None:
                # SuperGLUE/GLUE test splits are unlabelled: no desired output, no demonstration.
                raise InputError(path, f"line {n}", "label", "unlabelled split; use train as pool, val as queries")
            if r["label"] not in _NLI_WORDS:
                raise InputError(path, f"line {n}", "label", f"unknown label {r['label']!r}")
            out.append((f"{r['premise']}\nQuestion: {r['hypothesis']}\n{choices}", _NLI_WORDS[r["label"]]))
        return out
    raise ValueError(f"unknown icl dataset {dataset!r}; known: {', '.join(_ICL_SPLITS)}")


def icl(folder: str | Path, dataset: str, pool_split: str | None = None, query_split: str | None = None) -> Records:
    """Demonstration pool and queries of sst2 / trec / cb / rte (the icl/ folder).

    Keys are demonstrations "input\\nlabel" from `pool_split` (default train), exact duplicates dropped
    (sst2 train repeats 9 lines); queries are inputs of `query_split` (default the recommended
    dev/test/val split) with the label word as target. ICL has no gold demonstration, so
    `positive_ids` is empty: the LLM's reward decides which examples help.
    """
    if dataset not in _ICL_SPLITS:
        raise ValueError(f"unknown icl dataset {dataset!r}; known: {', '.join(_ICL_SPLITS)}")
    pool_split = pool_split or _ICL_SPLITS[dataset][0]
    query_split = query_split or _ICL_SPLITS[dataset][1]
    if pool_split == query_split:
        # A query would retrieve its own labelled copy: the reward would measure leakage, not help.
        raise ValueError(f"pool_split and query_split are both {pool_split!r}")
    folder = Path(folder)
    keys, seen = [], set()
    for i, (text, label) in enumerate(_icl_rows(folder, dataset, pool_split)):
        demo = f"{text}\n{label}"
        if demo not in seen:
            seen.add(demo)
            keys.append(_key(f"{dataset}-{pool_split}-{i}", "icl", demo))
    queries = [
        _query(f"{dataset}-{query_split}-{i}", "icl", text, label)
        for i, (text, label) in enumerate(_icl_rows(folder, dataset, query_split))
    ]
    return queries, keys


# ---------------------------------------------------------------- 3. conversational memory


def _pairs(turns: list[str], start: int = 0) -> list[str]:
    """Exchanges as the toy chat.json writes them: "Speaker 1: ...\\nSpeaker 2: ...", or one turn when odd.

    Speakers are assigned by position (MSC's previous sessions carry no speaker ids, and a few
    current-session turns carry a numeric worker id instead of "Speaker 1").
    """
    out = []
    for t in range(start, len(turns), 2):
        lines = [f"Speaker {1 + (t - start) % 2}: {turns[t].strip()}"]
        if t + 1 < len(turns):
            lines.append(f"Speaker 2: {turns[t + 1].strip()}")
        out.append("\n".join(lines))
    return out


def msc(path: str | Path, max_episodes: int | None = None, every_turn: bool = False) -> Records:
    """Multi-Session Chat episodes (conv_memory/msc/session_N_test.jsonl) as chat queries; no keys.

    Default cut, one query per episode: the opening exchange of the current (last) session. The
    query is Speaker 1's first utterance, the target Speaker 2's reply, and the history every
    exchange of the previous sessions. MSC crowdworkers open a new session by picking up what was
    said before, so this turn needs the memory, and the history holds earlier sessions only.
    `every_turn=True` gives one query per Speaker 1 turn instead (SOURCES.md's recommended eval,
    the toy chat.json's form): the history then also holds the earlier exchanges of the current session.
    Personas are not used (they summarise the memory the embedder should find).
    """
    path = Path(path)
    queries = []
    for e, episode in enumerate(_jsonl(path)[:max_episodes]):
        memory = [p for d in episode["previous_dialogs"] for p in _pairs([t["text"] for t in d["dialog"]])]
        turns = [t["text"] for t in episode["dialog"]]
        starts = range(0, len(turns) - 1, 2) if every_turn else [0] if len(turns) > 1 else []
        for t in starts:
            history = memory + _pairs(turns[:t])
            if not history or not turns[t].strip() or not turns[t + 1].strip():
                log.warning("%s episode %d turn %d: empty history or turn, skipped", path.name, e, t)
                continue
            qid = f"msc-{path.stem}-{e}" + (f"-t{t}" if every_turn else "")
            queries.append(_query(qid, "chat", turns[t].strip(), turns[t + 1].strip(), [], history))
    return queries, []


# ---------------------------------------------------------------- 4. long-context language modelling

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", re.M)
# Older files close the book with an "End of the Project Gutenberg EBook" line before the marker.
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M)


def _book_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    # The licence header and footer are not part of the book and would be easy, misleading chunks.
    text = text[start.end() if start else 0 : end.start() if end else len(text)]
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _words(text: str) -> list[str]:
    """Words with their trailing whitespace, so that joined chunks keep the paragraph breaks."""
    return re.findall(r"\S+\s*", text)


def gutenberg(
    path_or_folder: str | Path,
    chunk_words: int = 96,
    history_chunks: int = 32,
    target_words: int = 48,
    min_history: int = 2,
    max_queries: int | None = None,
) -> Records:
    """Next-chunk prediction over Project Gutenberg books (long_context_lm/gutenberg, or one .txt).

    Each book (header and footer stripped) is cut into chunks of `chunk_words` words (96 words are
    about the 128 tokens SOURCES.md recommends). Query i is chunk i; its target is the first
    `target_words` words of chunk i+1; its history, the candidates, is chunks [0, i-2] capped to the
    last `history_chunks`, as in LLM-Embedder: chunk i-1 is left out because it sits next to the
    query and would always win. Queries start once `min_history` chunks are available (a ranking
    needs two candidates). No keys: lrlm candidates belong to the query.
    """
    root = Path(path_or_folder)
    files = sorted(root.rglob("*.txt")) if root.is_dir() else [root]
    if not files:
        raise InputError(root, "folder", None, "no .txt files")
    queries = []
    for path in files:
        words = _words(_book_text(path))
        chunks = ["".join(words[s : s + chunk_words]).strip() for s in range(0, len(words), chunk_words)]
        for i in range(1 + min_history, len(chunks) - 1):
            if max_queries is not None and len(queries) >= max_queries:
                return queries, []
            history = chunks[max(0, i - 1 - history_chunks) : i - 1]
            target = "".join(_words(chunks[i + 1])[:target_words]).strip()
            queries.append(_query(f"lrlm-{path.stem}-{i}", "lrlm", chunks[i], target, [], history))
    return queries, []


# ---------------------------------------------------------------- 5. tool retrieval

_GORILLA_FILES = {
    "torchhub": ("torchhub_api", "torchhub_eval"),
    "tensorflowhub": ("tensorflowhub_api", "tensorflow_eval"),
    "huggingface": ("huggingface_api", "huggingface_eval"),
}


def _gorilla_doc_text(doc: dict[str, Any]) -> str:
    head = " | ".join(str(doc[f]) for f in ("domain", "framework", "functionality") if doc.get(f))
    return f"{head}\nAPI: {doc['api_name']}\nCall: {doc['api_call']}\n{doc.get('description') or ''}".strip()


def _gorilla_instruction(code: str) -> str:
    """The request of an APIBench item: "###Instruction: ... ###Output: ..." (spacing varies)."""
    text = re.split(r"#+\s*Output:", code)[0]
    text = re.sub(r"#+\s*Instruction:", "", text)
    # Some requests carry their input data ("###Input: ..."): part of the request; the markers are not.
    return re.sub(r"#+\s*Input:", "Input:", text).strip()


def gorilla_apibench(folder: str | Path, hub: str) -> Records:
    """Gorilla APIBench for one hub (torchhub, tensorflowhub, huggingface) in tool_retrieval/gorilla_apibench.

    Keys are the hub's API docs deduplicated by `api_call` (TF-Hub repeats 80 calls over 696 docs
    that differ only in wording; keeping them all would make true positives look like negatives);
    the first doc of each call is kept. Queries are the eval instructions (the text after
    "###Instruction:"), the target the gold `api_call`. The positive is the key with the gold
    api_call; 77 Hugging Face items whose api_call adds arguments (e.g. torch_dtype) to the doc's
    are matched by `api_name` instead, which is unique there. Items matching neither are dropped.
    """
    hub = {"tensorflow": "tensorflowhub"}.get(hub, hub)
    if hub not in _GORILLA_FILES:
        raise ValueError(f"unknown hub {hub!r}; known: {', '.join(_GORILLA_FILES)}")
    folder = Path(folder)
    api_file, eval_file = _GORILLA_FILES[hub]
    keys, by_call, by_name = [], {}, {}
    for j, doc in enumerate(_jsonl(folder / "api" / f"{api_file}.jsonl")):
        if doc["api_call"] not in by_call:
            by_call[doc["api_call"]] = f"gorilla-{hub}-{j}"
            keys.append(_key(by_call[doc["api_call"]], "tool", _gorilla_doc_text(doc), doc["api_name"]))
        by_name.setdefault(doc["api_name"], by_call[doc["api_call"]])
    queries, dropped = [], 0
    for i, item in enumerate(_jsonl(folder / "apibench" / f"{eval_file}.json")):
        gold = item["api_data"]
        kid = by_call.get(gold["api_call"]) or by_name.get(gold["api_name"])
        text = _gorilla_instruction(item["code"])
        if kid is None or not text:
            dropped += 1
            continue
        queries.append(_query(f"gorilla-{hub}-q{i}", "tool", text, item["api_call"], [kid]))
    if dropped:
        log.warning("gorilla %s: %d eval items without a matching API doc dropped", hub, dropped)
    return queries, keys


# ToolAlpaca's action that asks the user for missing details, not a function of the API.
_TOOLALPACA_NON_FUNCTIONS = {"getDetails"}


def toolalpaca(folder: str | Path) -> Records:
    """ToolAlpaca eval instructions against the functions of their APIs (tool_retrieval/toolalpaca).

    One key per function in `Function_Description` of eval_real.json and eval_simulated.json ("API:
    description" then the function's own description; the OpenAPI `components` entry is not a
    function). Queries are the 214 instructions; positives every distinct function of the golden
    answer; the target the first golden call, `name(input)`. AviationAPI's golden answers name 5
    functions its documentation lacks: those queries keep an empty `positive_ids`.
    public_apis.json (API-level blurbs, no functions) is not used.
    """
    folder = Path(folder)
    queries, keys, unresolved = [], [], 0
    for split in ("real", "simulated"):
        for a, api in enumerate(_json(folder / f"eval_{split}.json")):
            ids = {}
            for name, desc in api["Function_Description"].items():
                if name == "components":
                    continue
                ids[name] = f"toolalpaca-{split}-{a}-{name}"
                text = f"{api['Name']}: {api['Description']}\n{name}: {desc}"
                keys.append(_key(ids[name], "tool", text, api["Name"]))
            for i, (instruction, answer) in enumerate(zip(api["Instructions"], api["Golden_Answers"], strict=True)):
                calls = [(s["Action"].removeprefix("[Optional]"), s.get("Action_Input") or "") for s in answer]
                calls = [(n, arg) for n, arg in calls if n not in _TOOLALPACA_NON_FUNCTIONS]
                positives = list(dict.fromkeys(ids[n] for n, _ in calls if n in ids))
                unresolved += not positives
                target = f"{calls[0][0]}({calls[0][1]})" if calls else None
                queries.append(_query(f"toolalpaca-{split}-{a}-{i}", "tool", instruction, target, positives))
    if unresolved:
        log.info("toolalpaca: %d queries whose golden functions are not documented keep no positive", unresolved)
    return queries, keys


# ---------------------------------------------------------------- 6. conversational search


def trec_cast(path: str | Path, utterance: str = "raw", with_responses: bool = True) -> Records:
    """TREC CAsT 2021 topics (conv_search/trec_cast/2021/*_evaluation_topics_v1.0.json).

    Query text is the turn's utterance (`raw`, or the `manual` / `automatic` rewrite); history the
    topic's earlier utterances, each followed by its canonical passage when `with_responses`
    (CAsT 2021 shows the user the previous canonical response). A raw utterance is followed in the
    text by the history, latest first, since the embedder sees only the text (the reference
    llm_embedder convsearch queries likewise hold the context); rewrites stand alone. Keys are the canonical passages
    deduplicated by text (235 for 239 turns); the positive is the turn's own. The key id is
    `canonical_result_id` + `passage_id`; a repeated pair with another text (one in the manual
    file) gets a suffix. No desired output exists: `target` is None, so the reward needs a target
    from elsewhere and convsearch trains contrastively. Some canonical passages do not answer their
    turn (topic 106 turn 3 points at a school shooting); they are kept as the file gives them.
    """
    path = Path(path)
    field = {
        "raw": "raw_utterance",
        "manual": "manual_rewritten_utterance",
        "automatic": "automatic_rewritten_utterance",
    }[utterance]
    queries, keys, id_of_text, used = [], [], {}, set()
    for topic in _json(path):
        history: list[str] = []
        for turn in topic["turn"]:
            passage = turn["passage"].strip()
            if passage not in id_of_text:
                base = f"cast-{turn['canonical_result_id']}-{turn['passage_id']}"
                kid, n = base, 1
                while kid in used:
                    n += 1
                    kid = f"{base}~{n}"
                used.add(kid)
                id_of_text[passage] = kid
                keys.append(_key(kid, "convsearch", passage))
            qid = f"cast-{topic['number']}_{turn['number']}"
            if field not in turn:
                raise InputError(path, f"topic {topic['number']} turn {turn['number']}", field, "missing")
            text = turn[field]
            if utterance == "raw" and history:
                # A raw utterance leans on the conversation ("What are the most common types?"): the query is the
                # utterance, then the earlier turns, the latest first, so truncation cuts the oldest context.
                text = "\n".join([text, *reversed(history)])
            queries.append(_query(qid, "convsearch", text, None, [id_of_text[passage]], history))
            history = history + [turn["raw_utterance"]] + ([passage] if with_responses else [])
    return queries, keys


# ---------------------------------------------------------------- BEIR folders (any retrieval task)


def beir(folder: str | Path, split: str = "test", task: str = "qa") -> Records:
    """A BEIR folder: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`) and
    `qrels/<split>.tsv` (a header, then `query-id  corpus-id  score` separated by tabs).

    Ids are kept as the folder has them, so lemb's TREC run files score against the folder's own qrels. The queries
    are those judged in the split, in the queries file's order; each carries its judgments as `relevance` (grades
    as given, 0 included) and its positives are the ids graded > 0. A qrels line naming a query or a document that
    the folder does not have is an error, as is a grade that is not an integer >= 0. BEIR queries have no desired
    output (`target` is None): they serve eval and contrastive training."""
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        found = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise InputError(qrels_path, "file", None, f"not found; splits here: {', '.join(found) or 'none'}")
    keys, key_ids = [], set()
    for row in _jsonl(folder / "corpus.jsonl"):
        text = f"{row.get('text') or ''}".strip()
        kid = _beir_id(row, folder / "corpus.jsonl")
        if not text:
            raise InputError(row.path, f"{row.where} (_id {kid!r})", "text", "empty text")
        keys.append(_key(kid, task, text, (row.get("title") or "").strip() or None))
        key_ids.add(kid)
    texts = {}
    for row in _jsonl(folder / "queries.jsonl"):
        qid = _beir_id(row, folder / "queries.jsonl")
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise InputError(row.path, f"{row.where} (_id {qid!r})", "text", "expected a non-empty string")
        texts[qid] = row["text"]
    judged: dict[str, dict[str, int]] = {}
    with open(qrels_path, encoding="utf-8-sig") as fh:  # a byte-order mark is not part of the first id
        for n, line in enumerate(fh, start=1):
            parts = line.rstrip("\r\n").split("\t")
            if not line.strip() or (n == 1 and not _is_number(parts[-1])):
                continue  # the header (`query-id  corpus-id  score`, however spelled)
            where = f"line {n}"
            if len(parts) != 3:
                raise InputError(qrels_path, where, None, f"expected 3 tab-separated fields, got {len(parts)}")
            qid, kid, score = (p.strip() for p in parts)
            if qid not in texts:
                raise InputError(qrels_path, where, "query-id", f"{qid!r} is not in queries.jsonl")
            if kid not in key_ids:
                raise InputError(qrels_path, where, "corpus-id", f"{kid!r} is not in corpus.jsonl")
            if not re.fullmatch(r"\d+", score):
                raise InputError(qrels_path, where, "score", f"expected an integer grade >= 0, got {score!r}")
            judged.setdefault(qid, {})[kid] = int(score)
    queries = [
        _query(qid, task, texts[qid], None, [k for k, g in judged[qid].items() if g > 0], relevance=judged[qid])
        for qid in texts
        if qid in judged
    ]
    return queries, keys


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _beir_id(row: dict[str, Any], path: Path) -> str:
    value = row["_id"]
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise InputError(path, row.where, "_id", f"expected a non-empty id, got {value!r}")
    return str(value)
