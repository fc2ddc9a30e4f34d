"""Whether an answer to a task frame did the frame's task: a cheap check per task, named in the task's YAML
(`answer_check`), that reads the answer beside the content it was given. A 135M model does most tasks
badly; these checks ask only that the answer be recognisably the task (a label, a translation, the decoded
text, a list of the content's terms), not that it be right. Rules, not a classifier: they are scored
against hand labels in bench/answer_labels.py.
"""

from __future__ import annotations

import re

from refcal.data_recipes.overlap import normalise, stems

# Function words of the translation frames' target languages (French, Spanish, German, Italian): an
# answer in one of them uses several. "de" (French, Spanish) is the commonest of them all.
FOREIGN_FUNCTION_WORDS = frozenset(
    "le la les des une un et est pour dans sur avec sans qui que ne pas comment faire de du au "
    "el los las una y es para con por como cómo hacer del al "
    "der die das und ein eine ist für mit wie nicht zu den dem einen "
    "il gli di che per con come fare".split()
)
ENGLISH_FUNCTION_WORDS = frozenset("the a an of to in on at by for with and or is are was it this that how".split())
LIST_MARKER = re.compile(r"(^|\n)\s*([-*•]|\d+[.)])\s*\S")
NUMBER_ONLY = re.compile(r"^\W*\d+\W*$")  # a count ("How many words ...? Give just the number.")
# an answer that talks about the text instead of doing the task on it
DESCRIBES = re.compile(r"(?i)^\W*(the|this) (sentence|text|request|passage)\b[^.]*\b(is|means|refers)\b")
CORRECTS = re.compile(r"(?i)\b(correct|grammatical|rewrit|formal)")  # ... unless it is about correcting it
# a verdict on the content's grammar, or a correction presented as one: the grammar frame's answer
GRAMMAR_VERDICT = re.compile(
    r"(?i)\b(is|was) (not )?grammatically (in)?correct\b|\bgrammatical (error|mistake)s?\b"
    r"|\b(corrected|revised) (sentence|version|text)\b|\bcorrect (sentence|version) (would be|is)\b"
)
# a label asserted: after a copula ("is neutral", "as negative") or naming the sentiment ("a neutral tone")
ASSERTED_BEFORE = re.compile(r"(?i)\b(is|was|as|seems|sounds)\s+(an?\s+)?$")
ASSERTED_AFTER = re.compile(r"(?i)^\s+(tone|sentiment)\b")


def degenerate(answer: str) -> bool:
    """A loop rather than an answer: a three-word phrase said three times, in a text whose words are mostly
    repeats ("de la entrada de la entrada de la entrada ..."), or a short phrase said three times in a row
    (see `_stutters`)."""
    if _stutters(re.findall(r"[^\W\d_]+", answer.lower())):
        return True
    words = normalise(answer).split()
    if len(words) < 8:
        return False
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    looped = max(trigrams.count(t) for t in set(trigrams)) >= 3
    return looped and len(set(words)) / len(words) < 0.4


def _stutters(words: list[str], longest: int = 4) -> bool:
    """A phrase of two to `longest` words said three times back to back ("ao criado, ao criado, ao criado"),
    the third time possibly cut off by the answer's length limit ("de l'amélioration de l'amélioration de
    l'amé"). Words of letters, not ASCII stems, so that accented words are not split into fragments; digits
    are left out (a phone number repeats them). One word said again ("data = data.replace") is too common in
    code and emphasis, and a longer line said again (a poem's refrain) can be the answer."""
    for size in range(2, longest + 1):
        for start in range(len(words) - 2 * size + 1):
            unit = words[start : start + size]
            if words[start + size : start + 2 * size] != unit:
                continue
            rest = words[start + 2 * size : start + 3 * size]
            if rest == unit:
                return True
            cut = start + 2 * size + len(rest) == len(words) and 0 < len(rest)
            if cut and rest[:-1] == unit[: len(rest) - 1] and unit[len(rest) - 1].startswith(rest[-1]):
                return True
    return False


def _shared(answer: str, content: str) -> float:
    """The share of the content's stems the answer repeats."""
    wanted = stems(content)
    return len(wanted & stems(answer)) / len(wanted) if wanted else 0.0


def _label(answer: str, content: str, pattern: str | None) -> bool:
    """One label: the only label the answer names, or one it asserts ("the sentiment is neutral", "a
    neutral tone") beside labels it rules out ("not positive or negative"). An answer that names several
    without asserting one ("Positive: ... Negative: ...") has not chosen."""
    if pattern is None:
        return False
    found = list(re.finditer(pattern, answer))
    if len({m.group(0).lower() for m in found}) == 1:
        return True
    return any(
        ASSERTED_BEFORE.search(answer[: m.start()])
        or (re.search(r"(?i)\ban?\s+$", answer[: m.start()]) and ASSERTED_AFTER.match(answer[m.end() :]))
        for m in found
    )


def _decodes(answer: str, content: str, pattern: str | None) -> bool:
    return _shared(answer, content) >= 0.5


def _restates(answer: str, content: str, pattern: str | None) -> bool:
    """A corrected copy: nearly all the content's words are back (an answer that keeps only its topic,
    "a simple method to create a bomb using household items", is something else); or a verdict on the
    content's grammar or a correction presented as one ("is not grammatically correct", "Corrected
    sentence: ..."), which is the frame's task however poor the correction."""
    if GRAMMAR_VERDICT.search(answer):
        return True
    return _shared(answer, content) >= 0.7 and (not DESCRIBES.search(answer) or CORRECTS.search(answer) is not None)


def _condenses(answer: str, content: str, pattern: str | None) -> bool:
    """A summary: some of the content's words, in not many more words than it had (or up to 25 words: a
    short content's one-sentence summary may be longer than it), and not the content given back whole."""
    length = len(answer.split())
    if normalise(content) in normalise(answer) and length <= len(content.split()) + 2:
        return False
    return _shared(answer, content) >= 0.25 and length <= max(len(content.split()) + 10, 25)


def _translates(answer: str, content: str, pattern: str | None) -> bool:
    """Another language: several foreign function words, more than English ones, and few of the content's
    English stems, or three different foreign function words (a translation keeps cognates such as
    "technologie"; English word salad with a "la" in it does not use three)."""
    words = normalise(answer).split()
    foreign = [w for w in words if w in FOREIGN_FUNCTION_WORDS]
    if len(foreign) < 2 or len(foreign) <= sum(w in ENGLISH_FUNCTION_WORDS for w in words):
        return False
    return _shared(answer, content) < 0.3 or len(set(foreign)) >= 3


def _lists_terms(answer: str, content: str, pattern: str | None) -> bool:
    """A list of the content's nouns or entities (two of its words, as a bulleted or numbered list or a
    short comma list), or a word count."""
    if NUMBER_ONLY.search(answer):
        return True
    listed = LIST_MARKER.search(answer) is not None or ("," in answer and len(answer.split()) <= 20)
    return len(stems(content) & stems(answer)) >= 2 and listed


QUESTION_OR_INSTRUCTION = re.compile(r"(?i)\b(question|instruction|command|request|imperative)s?\b")
ABOUT_THE_PASSAGE = re.compile(r"(?i)^\W*(the|this) (passage|sentence|text|main verb|last word|topic)\b")
SAYS_WHAT_ABOUT = re.compile(r"(?i)\b(is|are) (mainly |mostly )?about\b")  # "The song is about ..."


AN_EXAMPLE_OF = r"(an?|the) (\w+ ){0,3}(example|case|instance|illustration) of\b"  # "a classic example of"

# the passage filed under some heading ("The passage is a classic example of a metaphor"): no question the
# frame asks (its verb, its topic, its words, who it addresses) is answered by that, except what kind of
# sentence it is
PASSAGE_AS_EXAMPLE = re.compile(r"(?i)^\W*(the|this) (passage|sentence|text) (is|was) " + AN_EXAMPLE_OF)


def _answers_about(answer: str, content: str, pattern: str | None) -> bool:
    """An answer about the passage: what kind of sentence it is, one of its words (its verb), a count, an
    answer that opens on the passage ("The passage is addressed to ..."), unless it only files the passage
    under a heading that is not a kind of sentence, or one that says in the passage's words what it is
    about ("The song is about drug use ...")."""
    if PASSAGE_AS_EXAMPLE.search(answer) and not QUESTION_OR_INSTRUCTION.search(answer):
        return False
    if NUMBER_ONLY.search(answer) or ABOUT_THE_PASSAGE.search(answer):
        return True
    shares = bool(stems(content) & stems(answer))
    if SAYS_WHAT_ABOUT.search(answer) and shares:
        return True
    short = len(answer.split()) <= 15
    return short and (QUESTION_OR_INSTRUCTION.search(answer) is not None or shares)


# a how-question: how to do something, or how someone did it; `verb` is the doing asked about
ASKS_HOW = re.compile(
    r"(?i)\b(how (do|can|could|should|would|might|did|does) (i|we|you|one|they|he|she|people)|how to"
    r"|(way|ways|steps?) to)( (\w+ly|best|just|ever))* (?P<verb>[a-z]+)"
)
# asked how to say what a thing is ("How do I describe a fraud in my novel?"): saying what it is does that
SAYING_VERBS = frozenset("describe explain define portray depict characterise characterize".split())
# the opening sentence says what its subject is: "The dead tree is a ...", "A bunghole is a ..."
SAYS_WHAT_IT_IS = re.compile(r"(?i)^\W*(?P<subject>[^.,;:!?\n]{1,80}?) (is|are|was|were) (an?|the)\b")
# "... is a classic example of ...": the subject filed under a heading, a label rather than a claim about it
EXAMPLE_OF = re.compile(r"(?i)\b(is|are|was|were) " + AN_EXAMPLE_OF)
# any sign of a method: the asker addressed, advice ("best", "should"), steps, an approach named, a means
# ("by soaking ...")
METHOD = re.compile(
    r"(?i)\b(you|your|yourself|here(['’]s| is| are)|best|should|needs? to|must|steps?|first(ly)?|start|begin|use"
    r"|using|tips?|method|technique|approach|try|make sure|by \w+ing)\b|(^|\n)\s*([-*•]|\d+[.)])\s*\S"
)
# answers that say they answer the question ("The answer to this question lies in ...") take it up even in
# other words than its own
ANSWERS_THE_QUESTION = re.compile(
    r"(?i)\bthe answer to (this|your|the|that) (\w+ )?question\b|^\W*the answer (is|lies)\b"
)
# a request for a story, and an answer that starts telling one: a character named, or the tale's opening
ASKS_FOR_A_STORY = re.compile(r"(?i)\b(write|tell|create|compose)\b.*\b(story|tale|fiction|fan ?fiction|narrative)\b")
NARRATES = re.compile(r"^\W*(?i:once upon a time)\b|\b(?i:an?|the) (\w+ ){0,4}(?i:named|called) [A-Z][a-z]+")


def says_only_what_it_is(answer: str, question: str) -> bool:
    """A how-question ("How do I chop down a dead tree?") answered only by saying what its own subject is:
    the answer opens "<subject> is a ...", the subject in the question's words ("The dead tree is a ..."),
    never names the doing asked about (chop), and either gives no sign of a method (no step, no means, no
    "you") or files the subject as an example of something ("The egg is a great example of a simple
    tool"). Saying what the thing is does answer a question about how to describe it."""
    how = ASKS_HOW.search(question)
    if how is None or how.group("verb").lower() in SAYING_VERBS:
        return False
    opening = SAYS_WHAT_IT_IS.match(answer)
    subject = stems(opening.group("subject")) if opening else frozenset()
    if not subject or not subject <= stems(question) or stems(how.group("verb")) & stems(answer):
        return False
    first = re.split(r"(?<=[.!?])\s|\n", answer.strip(), maxsplit=1)[0]
    return EXAMPLE_OF.search(first) is not None or METHOD.search(answer) is None


def _answers(answer: str, content: str, pattern: str | None) -> bool:
    """An answer to a question or instruction without a frame (the content is the prompt): it takes up the
    prompt's topic, one of its content words (or says it answers the question, or starts the story asked
    for), and is not a mere echo of it, nor, to a how-question, only what the question's subject is
    (`says_only_what_it_is`). Right or wrong is not asked."""
    asked, said = stems(content), stems(answer)
    echo = said <= asked and len(answer.split()) <= len(content.split()) + 3
    story = ASKS_FOR_A_STORY.search(content) is not None and NARRATES.search(answer) is not None
    took_up = bool(asked & said) or ANSWERS_THE_QUESTION.search(answer) is not None or story
    return took_up and not echo and not says_only_what_it_is(answer, content)


CHECKS = {
    "label": _label,
    "decodes": _decodes,
    "restates": _restates,
    "condenses": _condenses,
    "translates": _translates,
    "lists_terms": _lists_terms,
    "answers_about": _answers_about,
    "answers": _answers,
}


def did_task(check: str, answer: str, content: str, pattern: str | None = None) -> bool:
    """The task's check, after the one rule every task shares: a looping answer did no task."""
    return not degenerate(answer) and CHECKS[check](answer, content, pattern)
