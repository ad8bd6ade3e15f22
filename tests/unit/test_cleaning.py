"""Each cleaning step on real crawled text, and the two deliberate deviations from the original."""

from llm_twin_features.domain import cleaning


def test_unbold_maps_math_bold_letters_and_digits_to_ascii():
    assert cleaning.unbold("𝗥𝗔𝗚 𝗽𝗶𝗽𝗲𝗹𝗶𝗻𝗲𝘀 𝟮𝟬𝟮𝟰") == "RAG pipelines 2024"


def test_unitalic_maps_math_italic_letters_to_ascii():
    assert cleaning.unitalic("𝘧𝘦𝘢𝘵𝘶𝘳𝘦 𝘚𝘵𝘰𝘳𝘦") == "feature Store"


def test_emojis_and_arrows_become_spaces():
    cleaned = cleaning.remove_emojis_and_arrows("Ship it 🚀 → now ↓ ↳ done 🇫🇷")
    assert cleaned.split() == ["Ship", "it", "now", "done"]


def test_emoji_the_original_missed_are_removed_too():
    """Deviation: the original's ranges kept 🤔 🧪 ✅ ⭐ and the parts of keycap sequences."""
    cleaned = cleaning.remove_emojis_and_arrows("Hmm 🤔 test 🧪 ok ✅ star ⭐ step 1️⃣ team 👩‍💻")
    assert cleaned.split() == ["Hmm", "test", "ok", "star", "step", "1", "team"]


def test_urls_are_replaced_by_a_marker():
    text = "Docs at https://qdrant.tech/documentation/ and www.example.com/page, see."
    assert cleaning.replace_urls(text) == "Docs at [URL] and [URL] see."


def test_accents_and_non_latin_scripts_survive():
    """Deviation: the original dropped every non-ASCII character (`clean_non_ascii_chars`)."""
    text = "Café à Zürich: Straße, данные, 数据, δεδομένα"
    assert cleaning.clean_text(text) == text


def test_unicode_is_normalised():
    # NFKC composes "e" + combining acute into "é" and unfolds ligatures and full-width forms.
    assert cleaning.normalize_unicode("Cafe\u0301 ﬁne ＡＩ") == "Café fine AI"


def test_control_characters_are_removed_but_newlines_kept():
    assert cleaning.normalize_unicode("a\x00b\x07c\nd\te") == "abc\nd\te"


def test_content_values_are_joined_with_paragraph_breaks_skipping_none():
    """Deviation: the original glued values together ("TitleSubtitle") and crashed on None."""
    content = {"Title": "Feature pipelines", "Subtitle": None, "Content": "Body text.", "n": 3}
    assert cleaning.clean_content(content) == "Feature pipelines\n\nBody text."


def test_full_chain_on_a_linkedin_post():
    post = "𝗥𝗔𝗚 is 𝘦𝘢𝘴𝘺 🚀\n\nRead more → https://example.com/rag ✅"
    assert cleaning.clean_text(post) == "RAG is easy\n\nRead more [URL]"


def test_tidy_spaces_keeps_code_indentation():
    code = "def f():\n    return  1   \n"
    assert cleaning.tidy_spaces(code) == "def f():\n    return 1\n"


def test_repository_files_keep_their_path_as_header():
    content = {"src/app.py": "print('hi')", "README.md": "# Demo", "logo.png": None}
    assert (
        cleaning.clean_repository_content(content) == "README.md\n# Demo\n\nsrc/app.py\nprint('hi')"
    )
