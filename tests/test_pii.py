"""PII scrubbing: phone numbers and e-mail addresses are replaced, ordinary text never is.

Each case is checked alone and inside a sentence, so neither the match nor the text around it
depends on where the shape stands.
"""

from __future__ import annotations

import pytest

from src.datamodules.filters import scrub

# Shapes of ordinary text that look like digit groups joined by separators.
NOT_PHONES = [
    # years and year ranges
    "1812-1815",
    "1939–1945",
    "2019/2020",
    "1914 1918",
    "from 1990 to 2000",
    "2001-2005-2010",
    "(1999) 2000",
    "(2019) 123-456",
    # decimals and constants
    "365.2564",
    "3.14159265",
    "3.141 592 653 589 793",
    "0.5 0.25 0.125",
    # ISBNs, ISSNs, postal codes
    "978-0-306-40615-7",
    "ISBN 0-306-40615-2",
    "ISBN-13: 978-3-16-148410-0",
    "978 0 306 40615 7",
    "ISSN 0317-8471",
    "Boston, MA 02134-1234",
    # times and dates
    "12:30:45",
    "09:00-17:00",
    "0900-1700",
    "2024-01-15",
    "2024-01-15 10:30:00",
    "15.01.2024",
    "03-06-2024",
    "2024.01.15",
    "12/25/2024",
    # versions, network addresses, identifiers
    "v1.2.3",
    "10.0.19045",
    "Windows 10.0.19045.3803",
    "Python 3.11.7",
    "192.168.1.1",
    "255.255.255.0",
    "doi:10.1000/182",
    "id 1234567",
    # coordinates
    "40.7128, -74.0060",
    "40.7128° N, 74.0060° W",
    "+40.7128-074.0060",
    "+40.712776 -74.005974",
    "-33.8688, 151.2093",
    # arithmetic and amounts
    "2+2=4",
    "12 + 30 = 42",
    "1/3",
    "1,234,567.89",
    "$1,234,567.89",
    "1 000 000",
    "12 345 678",
    # ranges, lists, pages
    "pp. 1234-1567",
    "250-1000 words",
    "scores 41 39 12 48",
    "1-2-3-4-5-6-7",
    "4111 1111 1111 1111",
]

PHONES = [
    # the forms asked for
    "(555) 123-4567",
    "555-123-4567",
    "+1 555 123 4567",
    "+44 20 7946 0958",
    "+49 30 1234567",
    "020 7946 0958",
    "555.123.4567",
    "+33 1 23 45 67 89",
    # and their neighbours
    "(555)123-4567",
    "(555)-123-4567",
    "555 123 4567",
    "1-800-555-0199",
    "+1-555-123-4567",
    "+1 (555) 123-4567",
    "+1 415-555-0132",
    "+44 (0)20 7946 0958",
    "+61 2 9374 4000",
    "+81 3-1234-5678",
    "+91 98765 43210",
    "(020) 7946 0958",
    "(0161) 496 0000",
    "0161 496 0000",
    "07700 900123",
    "030 1234567",
    "03-1234-5678",
]

NOT_EMAILS = [
    "icon@2x.png",
    "logo@1.5x.jpg",
    "npm install lodash@4.17.21",
    "@types/node",
    "user@localhost",
    "follow @someone",
    "A@B.T",
]

EMAILS = [
    "jane.doe@example.org",
    "jane.doe+work@mail.example.org",
    "me@x.io",
    "first_last-1@sub.domain.co.uk",
]


@pytest.mark.parametrize("text", NOT_PHONES)
def test_ordinary_numbers_are_kept(text):
    for value in (text, f"In the text {text} stands.", f"({text})"):
        counts: dict[str, int] = {}
        assert scrub(value, counts) == value
        assert counts == {"e-mail addresses": 0, "phone numbers": 0}


@pytest.mark.parametrize("phone", PHONES)
def test_phone_numbers_are_replaced(phone):
    for value, scrubbed in (
        (phone, "<PHONE>"),
        (f"Call {phone} today.", "Call <PHONE> today."),
        (f"Call {phone}, or write.", "Call <PHONE>, or write."),
        (f"(tel. {phone})", "(tel. <PHONE>)"),
        (f"Tel: {phone} (office)", "Tel: <PHONE> (office)"),
    ):
        counts: dict[str, int] = {}
        assert scrub(value, counts) == scrubbed
        assert counts["phone numbers"] == 1


@pytest.mark.parametrize("phone", [p for p in PHONES if not p.startswith("+")])
def test_a_number_after_a_national_phone_number_stays(phone):
    # after "+cc" any digit groups may follow (a small number after one is taken with it);
    # the national shapes have fixed groups, so a following number is not part of them
    assert scrub(f"Call {phone} 24 hours a day", {}) == "Call <PHONE> 24 hours a day"


@pytest.mark.parametrize("text", NOT_EMAILS)
def test_email_like_text_is_kept(text):
    value = f"See {text} here."
    assert scrub(value, {}) == value


@pytest.mark.parametrize("email", EMAILS)
def test_email_addresses_are_replaced(email):
    counts: dict[str, int] = {}
    assert scrub(f"Mail {email}.", counts) == "Mail <EMAIL>."
    assert counts == {"e-mail addresses": 1, "phone numbers": 0}


def test_phones_among_ordinary_numbers():
    """One text mixing both: only the phone numbers go, and they are counted."""
    text = (
        "The war lasted 1812-1815; a year is 365.2564 days. Call (555) 123-4567 or "
        "+44 20 7946 0958 between 09:00-17:00 before 2024-01-15, quoting ISBN 0-306-40615-2 "
        "and version 10.0.19045. 2+2=4, and 1,234,567.89 is 1/3 of it."
    )
    counts: dict[str, int] = {}
    scrubbed = scrub(text, counts)
    assert scrubbed == text.replace("(555) 123-4567", "<PHONE>").replace(
        "+44 20 7946 0958", "<PHONE>"
    )
    assert counts == {"e-mail addresses": 0, "phone numbers": 2}


def test_scrub_walks_nested_values_and_leaves_roles():
    row = {
        "messages": [
            {"role": "user", "content": "I am at 555-123-4567, born 1939–1945?"},
            {"role": "assistant", "content": ["write to a@b.de", "in 2019/2020"]},
        ],
        "n": 1812,
    }
    counts: dict[str, int] = {}
    assert scrub(row, counts) == {
        "messages": [
            {"role": "user", "content": "I am at <PHONE>, born 1939–1945?"},
            {"role": "assistant", "content": ["write to <EMAIL>", "in 2019/2020"]},
        ],
        "n": 1812,
    }
    assert counts == {"e-mail addresses": 1, "phone numbers": 1}
