#!/usr/bin/env python3
"""Cuts the Wikipedia slice the web app computes key statistics from in the browser.

Usage: make-wiki-slice.py CORPUS OUT [CHARS]

CORPUS is a JSONL file with a "text" field per line (WikiExtractor output). OUT gets a JSON
array of the first non-empty texts, in file order, until their total length reaches CHARS
characters (default 120000, about 25-30k GPT-2 tokens). Each article is cut at paragraph ends
into pieces of at most PIECE characters (about 450 GPT-2 tokens): key statistics truncate every
text to the model's context, so whole articles would waste most of their tokens, and a short
text is a few seconds of a browser worker, so the tab's progress and Cancel stay prompt.
Standard library only.
"""
import json
import sys

PIECE = 2000


def pieces(text):
    """The article in paragraph-aligned pieces of at most PIECE characters."""
    out, cur = [], ""
    for para in text.split("\n"):
        para = para[:PIECE]
        if cur and len(cur) + 1 + len(para) > PIECE:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n{para}" if cur else para
    if cur.strip():
        out.append(cur)
    return out


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__.strip().splitlines()[2])
    corpus, out = sys.argv[1], sys.argv[2]
    limit = int(sys.argv[3]) if len(sys.argv) == 4 else 120_000
    texts, total = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            if total >= limit:
                break
            if not line.strip():
                continue
            text = json.loads(line).get("text") or ""
            if not text.strip():
                continue
            for piece in pieces(text):
                if total >= limit:
                    break
                texts.append(piece)
                total += len(piece)
    # One text per line keeps diffs readable; compact separators keep the file small.
    body = ",\n".join(json.dumps(t, ensure_ascii=False) for t in texts)
    with open(out, "w", encoding="utf-8") as f:
        f.write("[\n" + body + "\n]\n")
    print(f"{out}: {len(texts)} texts, {total} characters", file=sys.stderr)


if __name__ == "__main__":
    main()
