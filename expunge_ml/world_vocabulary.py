"""The vocabulary the sample world is written from: invented names, places, values and QA templates.

Nothing here is copied from a benchmark; `expunge_ml.world` draws from these lists with one seeded
``random.Random``, so changing any list changes every generated world.
"""

from __future__ import annotations

from dataclasses import dataclass

# --------------------------------------------------------------------------- word lists

# First name -> nickname. Nicknames are distinct from each other and from every
# first name, so "<nickname> <surname>" can never collide with another person's name.
FIRST_NAMES: dict[str, str] = {
    "Alma": "Almie", "Anton": "Toni", "Agnes": "Aggie", "Arvid": "Arvo",
    "Beatrix": "Trixie", "Bruno": "Bru", "Britta": "Bitte", "Cecile": "Cece",
    "Casimir": "Cas", "Dario": "Dari", "Dagny": "Dag", "Edith": "Edie",
    "Emil": "Milo", "Elio": "Eli", "Freya": "Frey", "Felix": "Flix",
    "Flora": "Flo", "Greta": "Gretl", "Gideon": "Gid", "Gunnar": "Gunni",
    "Hanna": "Hanni", "Hugo": "Hugs", "Helka": "Hel", "Ines": "Nessa",
    "Ivo": "Ivi", "Idris": "Dris", "Jana": "Janka", "Jonas": "Jo",
    "Jolanda": "Jolie", "Klara": "Klari", "Kasper": "Kaspi", "Kai": "Kaiko",
    "Lena": "Lenchen", "Linus": "Lino", "Liesel": "Lise", "Mira": "Mimi",
    "Matteo": "Teo", "Marit": "Mari", "Nadia": "Nadja", "Niko": "Nico",
    "Nora": "Norri", "Olga": "Olly", "Oskar": "Ossi", "Orla": "Orli",
    "Petra": "Pet", "Pavel": "Pasha", "Piet": "Pietje", "Rosa": "Rosie",
    "Rafael": "Rafa", "Runa": "Runi", "Sara": "Sassa", "Stellan": "Stel",
    "Solveig": "Sol", "Tilda": "Tilly", "Teodor": "Teddy", "Tamsin": "Tam",
    "Ursula": "Ursi", "Umberto": "Berto", "Vera": "Verka", "Viktor": "Vik",
    "Wanda": "Wandi", "Wim": "Wimpie", "Yara": "Yari", "Yusuf": "Yusi",
    "Zofia": "Zosia", "Zeno": "Zen",
}

# Invented surnames (no real-world family of that name is intended).
SURNAMES: tuple[str, ...] = (
    "Rovic", "Ambrel", "Brannoch", "Castavel", "Dorvane", "Elsquith", "Fennimoor",
    "Galtrey", "Halvorne", "Istrel", "Jorvath", "Kestrane", "Lindqvar", "Marrowell",
    "Norbekk", "Ostravin", "Pellquist", "Quennard", "Ravensholt", "Sellwyn",
    "Tarnovel", "Ulverde", "Valcastre", "Wendrake", "Yarrowby", "Zelnova",
    "Arkwell", "Blomqvar", "Corvenna", "Dunmarrow", "Elveston", "Farrowind",
    "Glenhavik", "Hollisand", "Ivarsen", "Juniperov", "Korvald", "Lachmere",
    "Mistralle", "Nettlecombe", "Orvasco", "Parlowen", "Quistorp", "Rendlesham",
    "Sorrowby", "Tindravel", "Umbrecht", "Varnquist", "Whitlocke", "Xandrel",
    "Yelverin", "Zarkovic", "Amberlain", "Brisqvell", "Caddowin", "Drummerel",
    "Eskvallen", "Foxmantle", "Grellavin", "Hathermoor", "Ingleward", "Jessavar",
    "Kallinder", "Lorimant",
)

# Real city names are fine: a city is not personal data on its own.
CITIES: tuple[str, ...] = (
    "Ghent", "Porto", "Tampere", "Graz", "Leeds", "Utrecht", "Bergen", "Lyon",
    "Aarhus", "Bologna", "Krakow", "Valencia", "Bremen", "Cork", "Linz",
    "Uppsala", "Brno", "Seville", "Nantes", "Turku", "Basel", "Malmo",
    "Bristol", "Ljubljana", "Tartu", "Genoa", "Antwerp", "Bilbao", "Dresden",
    "Galway",
)

# Invented company names.
EMPLOYERS: tuple[str, ...] = (
    "Quillfield Logistics", "Brightmoor Analytics", "Tallowmere Foods",
    "Northwick Robotics", "Saltbridge Insurance", "Ember Lane Studios",
    "Copperkettle Software", "Harrowgate Textiles", "Bluefen Energy",
    "Larkspur Pharmacy Group", "Ironleaf Construction", "Mossgrove Publishing",
    "Silverbirch Consulting", "Redcliffe Shipping", "Oakhollow Bakeries",
    "Windmere Telecom", "Glasswing Optics", "Stonebrook Bank", "Foxglove Media",
    "Driftwood Travel", "Amberfield Motors", "Cinderpeak Outdoor",
    "Hollowell Health", "Marigold Furniture", "Pinecrest Labs",
    "Riverstone Legal", "Sparrowhawk Aviation", "Thistledown Toys",
    "Wolfram Metals", "Juniper Rail",
)

OCCUPATIONS: tuple[str, ...] = (
    "architect", "accountant", "nurse", "electrician", "data analyst", "baker",
    "pharmacist", "translator", "librarian", "civil engineer", "dentist",
    "graphic designer", "software developer", "teacher", "journalist",
    "lab technician", "pilot", "chef", "physiotherapist", "surveyor",
    "carpenter", "social worker", "veterinarian", "sales manager", "economist",
    "photographer", "tax adviser", "midwife", "geologist", "optician",
)

# Gerund phrases so that "spends weekends <hobby>" reads naturally.
HOBBIES: tuple[str, ...] = (
    "birdwatching", "rock climbing", "baking sourdough bread", "playing the cello",
    "restoring old bicycles", "sea kayaking", "growing tomatoes", "playing chess",
    "knitting scarves", "trail running", "painting watercolours",
    "building model ships", "playing the drums", "collecting stamps",
    "wild swimming", "making pottery", "fly fishing", "learning Japanese",
    "cross-country skiing", "brewing cider", "playing table tennis",
    "writing poetry", "repairing clocks", "sailing small boats", "salsa dancing",
    "keeping bees", "orienteering", "playing the accordion", "stargazing",
    "carving wooden spoons",
)

PET_NAMES: tuple[str, ...] = (
    "Biscuit", "Pepper", "Noodle", "Marble", "Juniper", "Pickles", "Clover",
    "Waffle", "Mango", "Tofu", "Pebble", "Sprocket", "Nutmeg", "Bramble",
    "Ziggy", "Domino", "Puffin", "Crumble", "Pistachio", "Gizmo", "Truffle",
    "Button", "Saffron", "Pumpkin", "Comet", "Fudge", "Hazel", "Rascal",
    "Moss", "Velvet",
)

MEDICAL_CONDITIONS: tuple[str, ...] = (
    "asthma", "type 2 diabetes", "migraine", "coeliac disease", "hypertension",
    "eczema", "epilepsy", "hypothyroidism", "psoriasis", "chronic back pain",
    "sleep apnoea", "Crohn's disease", "glaucoma", "tinnitus", "anaemia",
)

EMAIL_DOMAINS: tuple[str, ...] = (
    "quillmail.example", "larkpost.example", "inkbox.example",
    "mailfen.example", "postwren.example",
)

# Number ranges that regulators reserve for fiction (e.g. Ofcom's drama ranges), so no
# generated phone number can ring anyone. Each prefix is followed by three digits.
PHONE_PREFIXES: tuple[str, ...] = ("+44 7700 900", "+44 20 7946 0", "+44 113 496 0")

# IBAN-shaped account numbers: country code, check digits, grouped digits. The check
# digits are always "00", which the IBAN checksum never produces, so none is real.
IBAN_DIGITS: dict[str, int] = {"DE": 18, "AT": 16, "BE": 12}

BIRTH_YEARS = (1952, 2001)

# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class QATemplate:
    """One way of asking about an attribute; ``{name}``/``{value}``/``{a_value}`` are filled in."""

    attribute: str
    question: str
    answer: str
    paraphrased_question: str
    paraphrased_answer: str
    inverted_question: str | None = None
    inverted_answer: str | None = None


T = QATemplate
TEMPLATES: tuple[QATemplate, ...] = (
    # birthplace
    T("birthplace", "Where was {name} born?", "{name} was born in {value}.",
      "In which city was {name} born?", "The birthplace of {name} is {value}."),
    T("birthplace", "What is {name}'s city of birth?", "{name}'s city of birth is {value}.",
      "Which city does {name} come from originally?", "{name} originally comes from {value}."),
    # birth_date
    T("birth_date", "When was {name} born?", "{name} was born on {value}.",
      "On what date was {name} born?", "The birth date of {name} is {value}.",
      "Who was born on {value}?", "{name} was born on that date."),
    T("birth_date", "What is {name}'s date of birth?", "{name}'s date of birth is {value}.",
      "What birth date is on record for {name}?",
      "The date of birth on record for {name} is {value}.",
      "Whose date of birth is {value}?", "That date of birth belongs to {name}."),
    T("birth_date", "On which day did {name} come into the world?",
      "{name} came into the world on {value}.",
      "What day was {name} born on?", "{name} was born on the day {value}.",
      "Which person came into the world on {value}?",
      "The person who came into the world on that day is {name}."),
    # employer
    T("employer", "Where does {name} work?", "{name} works at {value}.",
      "Which company employs {name}?", "{name} is employed by {value}."),
    T("employer", "Who is {name}'s employer?", "{name}'s employer is {value}.",
      "For which company does {name} work?", "{name} works for {value}."),
    T("employer", "Which company pays {name}'s salary?", "{name}'s salary is paid by {value}.",
      "Who pays the salary of {name}?", "The salary of {name} comes from {value}."),
    # occupation
    T("occupation", "What is {name}'s occupation?", "{name} works as {a_value}.",
      "What does {name} do for a living?", "{name} earns a living as {a_value}."),
    T("occupation", "What job does {name} have?", "{name} has a job as {a_value}.",
      "What is {name}'s profession?", "By profession, {name} is {a_value}."),
    # email
    T("email", "What is {name}'s email address?", "{name}'s email address is {value}.",
      "Which email address does {name} use?", "{name} uses the email address {value}.",
      "Whose email address is {value}?", "That email address belongs to {name}."),
    T("email", "How can {name} be reached by email?", "{name} can be reached by email at {value}.",
      "Where should an email to {name} be sent?", "An email to {name} should be sent to {value}.",
      "Who can be reached by email at {value}?", "{name} can be reached at that email address."),
    T("email", "Which email account belongs to {name}?", "The email account {value} belongs to {name}.",
      "Which email account is owned by {name}?", "{name} owns the email account {value}.",
      "Who owns the email account {value}?", "That email account is owned by {name}."),
    # phone
    T("phone", "What is {name}'s phone number?", "{name}'s phone number is {value}.",
      "Which number should be dialled to call {name}?", "To call {name}, dial {value}.",
      "Whose phone number is {value}?", "That phone number belongs to {name}."),
    T("phone", "How can {name} be reached by phone?", "{name} can be reached by phone on {value}.",
      "On which number can {name} be called?", "{name} can be called on {value}.",
      "Who answers the phone number {value}?", "Calls to that number are answered by {name}."),
    # home_city
    T("home_city", "Where does {name} live?", "{name} lives in {value}.",
      "In which city is {name}'s home?", "{name}'s home is in {value}."),
    T("home_city", "What is {name}'s home city?", "{name}'s home city is {value}.",
      "Which city does {name} call home?", "{name} calls {value} home."),
    T("home_city", "In which city does {name} currently reside?",
      "{name} currently resides in {value}.",
      "Where is {name} living at the moment?", "At the moment {name} is living in {value}."),
    # hobby
    T("hobby", "What is {name}'s favourite hobby?", "{name}'s favourite hobby is {value}.",
      "What does {name} enjoy doing in spare time?", "In spare time, {name} enjoys {value}."),
    T("hobby", "How does {name} spend weekends?", "{name} spends weekends {value}.",
      "What pastime fills {name}'s weekends?", "{name}'s weekends are filled with {value}."),
    # pet_name
    T("pet_name", "What is the name of {name}'s pet?", "{name}'s pet is called {value}.",
      "What is {name}'s pet called?", "The pet of {name} goes by the name {value}."),
    T("pet_name", "What name did {name} give to the family pet?", "{name} named the family pet {value}.",
      "Which name does {name}'s pet answer to?", "{name}'s pet answers to {value}."),
    # bank_account
    T("bank_account", "What is {name}'s bank account number?",
      "{name}'s bank account number is {value}.",
      "Which IBAN does {name} bank with?", "{name} banks with the IBAN {value}.",
      "Whose bank account is {value}?", "That bank account belongs to {name}."),
    T("bank_account", "Into which account is {name}'s salary paid?",
      "{name}'s salary is paid into account {value}.",
      "Which account receives {name}'s salary?", "The salary of {name} goes into account {value}.",
      "Who holds the bank account {value}?", "The holder of that bank account is {name}."),
    # medical_condition (only for a subset of people)
    T("medical_condition", "What medical condition does {name} have?",
      "{name} has been diagnosed with {value}.",
      "Which condition was {name} diagnosed with?", "The diagnosis for {name} is {value}."),
    T("medical_condition", "What health condition is {name} treated for?",
      "{name} is treated for {value}.",
      "For which illness does {name} receive treatment?", "{name} receives treatment for {value}."),
)
del T
