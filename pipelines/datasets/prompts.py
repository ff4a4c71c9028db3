"""Prompts from dataset fields: class names through a template, and a caption with one phrase replaced."""

from __future__ import annotations

import re

from pipelines.datasets.rows import DatasetError

DEFAULT_CLASS_TEMPLATE = "a photo of {article} {name}"
_ARTICLE_RE = re.compile(r"(?:^|\s)(a|an|the)\s*$", re.IGNORECASE)
_LEADING_ARTICLE_RE = re.compile(r"^(a|an|the)\s+", re.IGNORECASE)


def class_prompt(name: str, template: str = DEFAULT_CLASS_TEMPLATE) -> str:
    """A class name as a prompt: ``template`` with ``{name}`` and ``{article}`` ('a'/'an') filled in.

    >>> class_prompt("Afghan hound")
    'a photo of an Afghan hound'

    Args:
        name: the class name (surrounding spaces are dropped).
        template: a format string with ``{name}`` and optionally ``{article}``.

    Returns:
        The prompt.
    """
    name = name.strip()
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return template.format(name=name, article=article)


def replace_phrase(caption: str, source_phrase: str, target_phrase: str) -> str:
    """The caption with ``source_phrase`` replaced by ``target_phrase`` (the paper's edit text in context).

    The match ignores case; an article already in the caption before the phrase is kept, and a leading
    article of the target phrase is then dropped ("a Shiba Inu dog" → "a raccoon", never "a a raccoon");
    a kept "a"/"an" is chosen anew for the target's first letter.

    Args:
        caption: the source caption.
        source_phrase: the phrase to replace (its first occurrence).
        target_phrase: what replaces it.

    Returns:
        The target caption.

    Raises:
        DatasetError: the caption does not contain ``source_phrase`` (a ``ValueError``).
    """
    match = re.search(re.escape(source_phrase.strip()), caption, re.IGNORECASE)
    if match is None:
        raise DatasetError(f"source phrase {source_phrase!r} is not in the caption")
    before, after = caption[: match.start()], caption[match.end() :]
    target = target_phrase.strip()
    caption_article = _ARTICLE_RE.search(before)
    target_article = _LEADING_ARTICLE_RE.match(target)
    if caption_article and target_article:
        target = target[target_article.end() :]
        word = caption_article.group(1)
        if word.lower() in ("a", "an"):
            article = "an" if target[:1].lower() in "aeiou" else "a"
            article = article.capitalize() if word[0].isupper() else article
            before = before[: caption_article.start(1)] + article + before[caption_article.end(1) :]
    return before + target + after
