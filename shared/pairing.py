"""Pairing a new node with a short code: the code, the messages, and both sides of the exchange. Pure: no I/O.

**The code** is ``<slot>-<word>-<word>-<word>`` (``42-maple-otter-violin``). The slot (1 to 99) is public: a
joiner sends it in the clear so that the member holding that code answers (others say they have none), and it
is part of both sides' SPAKE2 identities. The three words, from :data:`WORDS` (2048 words: 11 bits each), are
the secret: 33 bits. The member deletes its code at the first attempt for its slot, right or wrong, so a
guesser has one try per code: 1 chance in 2**33 (with magic-wormhole's reasoning, which makes do with 16).

**The exchange**, two HTTP round trips (``docs/security.md``, "Pairing a node")::

    joiner → member  StartRequest   {slot, msg: SPAKE2 side A}
    member → joiner  StartAnswer    {session, msg: SPAKE2 side B, confirm: the member's tag}
    joiner → member  FinishRequest  {session, confirm: the joiner's tag}     (only if the member's tag holds)
    member → joiner  FinishAnswer   {nonce, sealed: the farm key, ChaCha20-Poly1305}

SPAKE2 (RFC 9382; the ``spake2`` package, as magic-wormhole uses it) gives both sides one shared key when, and
only when, both used the same code; an eavesdropper learns nothing it could test a guess against, and a party
in the middle gets one guess per exchange. From that key HKDF derives two confirmation keys and the sealing
key, each bound to the whole transcript (slot and both SPAKE2 messages): a changed message fails a tag, and
the farm key is sent only after the joiner has proven it holds the code.

Errors: a malformed message raises :class:`shared.errors.ProtocolError`; an exchange that fails (a wrong
code, a changed message) raises :class:`PairingFailed` (a ProtocolError); a code a person mistyped raises
:class:`shared.errors.ConfigError`, naming what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import hmac
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from spake2 import SPAKE2_A, SPAKE2_B  # type: ignore[import-untyped]

from shared import security
from shared.errors import ConfigError, ProtocolError

VERSION: Final = 1
SLOTS: Final = range(1, 100)
WORDS_PER_CODE: Final = 3
CODE_TTL_S: Final = 15 * 60.0  # how long an issued code is served
SESSION_TTL_S: Final = 60.0  # between the two round trips
MAX_BODY: Final = 4096  # bytes of one request or answer
_LABEL: Final = b"netqueues pairing v1"


class PairingFailed(ProtocolError):
    """The exchange failed: the codes differ, or a message was changed on the way."""


# --- the code -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Code:
    """A pairing code. ``str(code)`` is the form a person types."""

    slot: int
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        words_ok = len(self.words) == WORDS_PER_CODE and all(w in _WORD_SET for w in self.words)
        if self.slot not in SLOTS or not words_ok:
            raise ConfigError("not a pairing code")

    def __str__(self) -> str:
        return "-".join((str(self.slot), *self.words))

    def __repr__(self) -> str:
        return f"Code(slot={self.slot}, words=<hidden>)"  # the words are the secret: never in a log

    @property
    def verifier(self) -> bytes:
        """What both sides feed SPAKE2 and what a member stores instead of the code (password-equivalent)."""
        return verifier(self.slot, self.words)


def new_code(slot: int | None = None) -> Code:
    """A fresh random code (a random slot unless one is given)."""
    return Code(slot if slot is not None else SLOTS[secrets.randbelow(len(SLOTS))],
                tuple(secrets.choice(WORDS) for _ in range(WORDS_PER_CODE)))


def parse_code(text: str) -> Code:
    """The code a person typed: case, spaces instead of dashes and stray blanks do not matter."""
    parts = [p for p in re.split(r"[\s\-_.]+", text.strip().lower()) if p]
    example = "like 42-maple-otter-violin"
    if not parts or not parts[0].isdigit():
        raise ConfigError(f"a pairing code starts with its number, {example}")
    slot = int(parts[0])
    if slot not in SLOTS:
        raise ConfigError(f"a pairing code's number is 1 to 99, {example}")
    words = parts[1:]
    if len(words) != WORDS_PER_CODE:
        raise ConfigError(f"a pairing code has a number and {WORDS_PER_CODE} words ({len(words)} given), "
                          f"{example}")
    for w in words:
        if w not in _WORD_SET:
            near = difflib.get_close_matches(w, WORDS, n=3)
            hint = f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""
            raise ConfigError(f"{w!r} is not one of the pairing code words{hint}; check the spelling")
    return Code(slot, tuple(words))


def verifier(slot: int, words: tuple[str, ...]) -> bytes:
    return hashlib.sha256(_frame(_LABEL, b"code", b"%d" % slot, "-".join(words).encode())).digest()


class PendingCode(BaseModel):
    """A code a member serves (``<data_dir>/pairing.json``): its slot, its verifier and when it expires."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    v: Literal[1] = 1
    slot: Annotated[int, Field(ge=SLOTS.start, lt=SLOTS.stop)]
    verifier: Annotated[str, Field(min_length=43, max_length=43)]
    expires: float  # POSIX seconds

    @classmethod
    def issue(cls, code: Code, now: float, ttl_s: float = CODE_TTL_S) -> PendingCode:
        return cls(slot=code.slot, verifier=_b64(code.verifier), expires=now + ttl_s)

    def live(self, now: float) -> bool:
        return now < self.expires


# --- messages -----------------------------------------------------------------------------------------------
_B64 = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[A-Za-z0-9_-]+$")]
_Session = Annotated[str, Field(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, hide_input_in_errors=True)
    v: Literal[1] = VERSION


class StartRequest(_Message):
    slot: Annotated[int, Field(ge=SLOTS.start, lt=SLOTS.stop)]
    msg: _B64


class StartAnswer(_Message):
    session: _Session
    msg: _B64
    confirm: _B64


class FinishRequest(_Message):
    session: _Session
    confirm: _B64


class FinishAnswer(_Message):
    nonce: _B64
    sealed: _B64


class Delivered(_Message):
    """What the member seals for the joiner."""

    key: Annotated[str, Field(max_length=200)]
    farm_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    member: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")]  # a node id: safe to print


M = TypeVar("M", bound=_Message)


def decode(model: type[M], body: bytes) -> M:
    """One message from its JSON body; ProtocolError (saying what, never echoing it) when it is not one."""
    if len(body) > MAX_BODY:
        raise ProtocolError(f"pairing message larger than {MAX_BODY} bytes")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        where = ", ".join(".".join(str(p) for p in e["loc"]) or e["type"] for e in exc.errors()[:3])
        raise ProtocolError(f"not a pairing {model.__name__} ({where})") from None


def encode(message: _Message) -> bytes:
    return message.model_dump_json().encode()


# --- both sides ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Keys:
    member_tag: bytes
    joiner_tag: bytes
    seal: bytes
    transcript: bytes


def _schedule(shared_key: bytes, slot: int, msg_a: bytes, msg_b: bytes) -> _Keys:
    transcript = _frame(_LABEL, b"%d" % slot, msg_a, msg_b)
    okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=hashlib.sha256(transcript).digest(),
               info=_LABEL + b" keys").derive(shared_key)
    return _Keys(okm[:32], okm[32:64], okm[64:], transcript)


def _tag(key: bytes, who: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, who + b"\0" + transcript, hashlib.sha256).digest()


def _ids(slot: int) -> dict[str, bytes]:
    return {"idA": _LABEL + b" joiner %d" % slot, "idB": _LABEL + b" member %d" % slot}


def _finish_spake(side: Any, inbound: bytes) -> bytes:
    # The spake2 package raises its own errors, ValueError, or its curve code's exceptions for a message that
    # is not a point of the group: any failure here means the message was not a SPAKE2 message.
    try:
        key: bytes = side.finish(inbound)
    except Exception as exc:
        raise ProtocolError("not a SPAKE2 message") from exc
    return key


class Joiner:
    """The new node's side of one exchange (single use)."""

    def __init__(self, code: Code) -> None:
        self._slot = code.slot
        self._spake = SPAKE2_A(code.verifier, **_ids(code.slot))
        self._msg_a: bytes = self._spake.start()
        self._keys: _Keys | None = None

    def start(self) -> StartRequest:
        return StartRequest(slot=self._slot, msg=_b64(self._msg_a))

    def confirm(self, answer: StartAnswer) -> FinishRequest:
        """Check the member's tag and prove we hold the code; PairingFailed when the codes differ."""
        if self._keys is not None:
            raise PairingFailed("this exchange was already answered")
        msg_b = _unb64(answer.msg)
        keys = _schedule(_finish_spake(self._spake, msg_b), self._slot, self._msg_a, msg_b)
        if not hmac.compare_digest(_unb64(answer.confirm), _tag(keys.member_tag, b"member", keys.transcript)):
            raise PairingFailed("wrong pairing code (or the answer was changed on the way)")
        self._keys = keys
        mine = _tag(keys.joiner_tag, b"joiner", keys.transcript)
        return FinishRequest(session=answer.session, confirm=_b64(mine))

    def open(self, answer: FinishAnswer) -> Delivered:
        """The farm key the member sealed for us, checked against its farm id."""
        if self._keys is None:
            raise PairingFailed("the member's answer came before its confirmation")
        try:
            plain = ChaCha20Poly1305(self._keys.seal).decrypt(_unb64(answer.nonce), _unb64(answer.sealed),
                                                               self._keys.transcript)
        except (InvalidTag, ValueError) as exc:
            raise PairingFailed("the sealed farm key does not open (changed on the way)") from exc
        delivered = decode(Delivered, plain)
        try:
            real_id = security.farm_id(security.parse_key(delivered.key))
        except ConfigError as exc:
            raise PairingFailed("the member sent something that is not a farm key") from exc
        if real_id != delivered.farm_id:
            raise PairingFailed("the farm key does not match the farm id it came with")
        return delivered


@dataclass
class MemberSession:
    """The member's side between the two round trips (single use)."""

    id: str
    expires: float  # monotonic seconds
    _keys: _Keys = field(repr=False)
    used: bool = False

    def finish(self, request: FinishRequest, delivered: Delivered) -> FinishAnswer:
        """Seal ``delivered`` for the joiner if its tag proves it holds the code; PairingFailed otherwise."""
        if self.used:
            raise PairingFailed("pairing session already used")
        self.used = True
        k = self._keys
        if not hmac.compare_digest(_unb64(request.confirm), _tag(k.joiner_tag, b"joiner", k.transcript)):
            raise PairingFailed("wrong pairing code")
        nonce = secrets.token_bytes(12)
        sealed = ChaCha20Poly1305(k.seal).encrypt(nonce, encode(delivered), k.transcript)
        return FinishAnswer(nonce=_b64(nonce), sealed=_b64(sealed))


def member_start(pending: PendingCode, request: StartRequest, now: float) -> tuple[MemberSession, StartAnswer]:
    """Answer a joiner's first message for ``pending`` (the caller has already burnt the code)."""
    if request.slot != pending.slot:
        raise ProtocolError("pairing request for another slot")
    spake = SPAKE2_B(_unb64(pending.verifier), **_ids(pending.slot))
    msg_b: bytes = spake.start()
    msg_a = _unb64(request.msg)
    keys = _schedule(_finish_spake(spake, msg_a), pending.slot, msg_a, msg_b)
    session = MemberSession(secrets.token_urlsafe(18), now + SESSION_TTL_S, keys)
    return session, StartAnswer(session=session.id, msg=_b64(msg_b),
                                confirm=_b64(_tag(keys.member_tag, b"member", keys.transcript)))


# --- attempts per source ------------------------------------------------------------------------------------
@dataclass
class AttemptLimiter:
    """At most ``burst`` attempts per source, one more every ``refill_s`` (a token bucket per source, RFC 2697's
    shape). Bounded: at most ``max_sources`` sources are tracked; past that, new sources wait."""

    burst: int = 5
    refill_s: float = 60.0
    max_sources: int = 1024
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # source → (tokens, at)

    def allow(self, source: str, now: float) -> bool:
        tokens, at = self._buckets.get(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) / self.refill_s)
        if source not in self._buckets and len(self._buckets) >= self.max_sources:
            self._forget_full(now)
            if len(self._buckets) >= self.max_sources:
                return False
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            return False
        self._buckets[source] = (tokens - 1.0, now)
        return True

    def retry_after(self, source: str, now: float) -> float:
        tokens, at = self._buckets.get(source, (0.0, now))
        return max(0.0, (1.0 - tokens) * self.refill_s - (now - at))

    def _forget_full(self, now: float) -> None:
        for source, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) / self.refill_s >= self.burst:
                del self._buckets[source]


# --- helpers ------------------------------------------------------------------------------------------------
def _frame(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different part lists give the same bytes."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("a pairing message field is not base64url") from exc


# --- the words (the project's own list: short, common, distinct, lowercase a-z) -----------------------------
_WORD_TEXT: Final = """
abbey able ace acorn acre acrobat actor admiral admire adopt agent agile airy alarm album alcove alien
alley allow alloy almond aloe alpha altar amber amp ample amuse anchor anchovy angel angle ankle anode
answer ant anvil applaud apple apricot april apron arbor arc arch archer archery arena argon arm army
aroma arrive arrow art artist ash ask aspen atlas atom atrium attach attic auger august aurora author
autumn avenue award axis axle azure baby bacon badge badger bag bagel bake baker bakery balcony ball
ballad ballet balloon ballot bamboo banana band banjo bank banner barber bard bark barley barn baron
barrel basalt basil basin basket bass bat batch bathe baton bay bayou beach beacon beam bean bear beard
beaver bed bee beef beet beetle behave beige bell bellows belly belt bench bend beret berry beta bicycle
bingo birch bird biscuit bishop bison black blade blanket blaze blazer blend blender bless blink block
bloom blossom blouse blue bluff blush boar board boast boat bobcat boil bold bolt bonnet bonsai bonus book
boost boot borrow boson bottle bottom boulder bounce bouncy bound bowl box boxer boxing bracket brain
brake bramble branch brand brass brave bravo bread breathe breeze breezy brew briar brick bride bridge
brie bright brisk bronze brook broom broth brown brush bubble bubbly bucket buckle buddy budget buffalo
buggy build bulb bull bump bun bundle bunny burger burrow bus bush busy butler butte butter button buzz
cabana cabbage cabin cable cactus cadet cafe cake calm camel camera camp camper campus canal canary candid
candle candy canoe canvas canyon cap cape captain car carbon card care cargo carpet carrot carry cart
carton carve cash cashew castle cat catch catnip cave cavern cedar celery cell cellar cello census century
cereal chain chair chalk champ change chant chapel chapter charge charm chart chase cheek cheer cheery
cheese cheetah chef cherry chess chest chew chicken chief chili chimney chin chip chisel chive choir chop
chorus chroma chunky cider circle circus citrus city clam clamp clap classy clay clean clear clerk clever
cliff climate climb clinic cloak clock clog cloud cloudy clove clover clown coach coast coat cobalt cobra
cocoa coconut cod code coffee coil coin collar collect colt comb comet comfy comic compass cone cook
cookie copper coral cord cork corn corset cosmic cosmos cottage cotton couch count county coupon court
cousin cove cover cow cowboy cowgirl coyote cozy crab crack cracker crane crate crater crawl crayon cream
credit creek crepe crest cricket crimson crisp critic cross crow crowbar crown crystal cube cuddly cumin
cup cupcake curly curry curtain curve cushion custard cyan cyborg cycle cycling cypress dahlia dairy daisy
dale dance dancer dapper dare daring dashing date dawn daytime decade decide deck deer deliver delta den
denim depend depot deputy desert design desk dew dial diamond diary dice diesel dig dill dingo dinner
dipole disc disco dish disk ditch dive diver diving dizzy dock doctor dog doll dollar dome domino donkey
door dorm dot dough dove dragon drama draw drawer dream dress drift drill drink drive driver drop drum
dryer duchess duck duet duke dune dusk dust dusty duty eager eagle early earn earth earthy easel echo edge
eel egg elbow elder elegant element elf elixir elk elm ember emerald empire emu energy engine enigma enjoy
enter envoy enzyme epic era ermine escape essay estuary ether evening event exam exotic explain explore
fable fabric factor fade fair fairy falcon fame famous fan fancy farm farmer fast fasten fedora fence
fencing fender fennel fern ferret ferry fetch fever fiddle field fierce fig figure file fill film filter
finch fine finger fir firm fish fitness fix flag flame flap flash flask flea fleet flint flip float flood
flora flow flower fluffy flute fly focus fog fold folder follow forest fork fort forum fossil fox foyer
frame fresco fresh friday friend frisbee frog frost frosty fruit fry fudge fuel funnel funny fusion fuzzy
galaxy gallery gallon gamma garage garden garlic garnet gate gather gaze gazebo gear gecko gem genie
genome gentle gerbil geyser giant gift gifted giggle ginger gizmo glacier glad glade glass glen glide
glider globe glossy glove glow glue gnome goat goblet goblin gold golden golf goose gopher gorge gospel
gossip gown grab grain gram grand granite grape grass grassy grater gravy great green greet grid grill
grin grip grove grow guard guava guess guest guide guitar gulf gull gumbo guru gust gym habit hall halo
ham hammer hammock hamster hand handle hang hangar happy hardy hare harp harvest hasty hat hatch haven
hawk hazel heal heart hearty heather heavy hedge height helium helix helmet help hemlock hen herb hermit
hero heron hexagon hike hiking hill hinge hobby hockey hollow holly honest honey hood hook hoop hop hops
horizon horn hornet horse hose host hostel hotel hound house hover hug hum humble hungry hunt hunter
hurdle hurry hut hyena hymn ibis ice icon icy idea igloo iguana image imagine impact index indigo inform
ink inlet inn input intern invent invite ion iris iron island isle isotope ivory ivy jackal jacket jade
jaguar jam janitor jar jargon jasmine jay jazz jazzy jeans jeep jelly jersey jester jewel jigsaw jingle
jockey jog join joke jolly joule journal joy judge judo juggle juggler juice juicy july jumbo jump june
jungle juniper kale karate kayak kebab keen keeper kelvin kernel kettle key khaki kick kid kilt kimono
kind king kiosk kiss kitchen kite kitten kiwi kneel knit knock knoll knot koala label lace ladder ladle
lagoon lake lamb lamp land lantern large lark lasagna laser last latch laugh launch laurel lava lawn
lawyer layer lazy leader leaf leap learn ledge leek legend legging lemon lemur lens lentil lettuce level
lever library lick lift light like lilac lily lime limit line linen lion liquid list listen lithium little
live lively lizard llama load loafer lobby lobster lock locker locket lodge loft lofty logic look loop
lord lotion lottery lotus loud love loyal lucid lucky lumber lunar lunch lute lynx lyric macaw machine
magenta magic magnet magpie maiden major maker mallet mallow mammal mango manor mansion mantis mantle map
maple marble march margin marina mark market maroon marry marsh marshal marten mascot mask match matrix
matter mayor meadow measure medal medic mellow melody melon melt memo mend mentor menu merit mermaid merry
mesa metal meteor method metro mews mica micro midday mighty milk mill mimosa mine miner mineral mink mint
minty minute mirror miss mist misty mitt mitten mix mixer mocha model modern modest module mole moment
monday monitor monk monkey moon moor moose morning moss mossy moth motor motto mound mouse move movie mud
muddle muddy muffin mug mule mummy mural muscle museum mustard myrtle mystery myth nacho nail nanny nap
narrow nation native nature navy neat nebula nectar needle neon nerve nest net nettle neutron newt nice
nickel nifty nimble ninja noble nod nomad noodle nook noon north notch note notice novel nucleus nugget
number nurse nutmeg nylon oak oar oasis oat obey object oboe ocean october octopus odd offer office ogre
ohm olive omega onion onyx opal open opera option oracle orange orbit orchard orchid order oregano organ
origin oriole ornate osprey otter outfit output oval oven overall owl oxygen oyster ozone pack pact paddle
page pagoda pail paint painter pal palace palette palm pan panda panel panther pantry paper paprika parade
parcel park parka parrot parsley party pass pasta pastel pastor pat patch patio patron pattern pause peach
peak peanut pear pearl pebble pecan pedal peddler peel peeler peep pelican pen pencil penguin peony pepper
peppy perform perky permit pesto petal phase phone photo photon phrase piano pick pickle pie pier pig
pigeon piglet pillow pilot pin pinch pine pink pioneer pipe pirate pixel place plain plan planet plant
plasma plate plateau play plaza pledge plenty plover pluck plucky plum plunger plush pocket podium poem
poet point polar polish polite polka pollen polymer poncho pond pony pop poplar poppy porch port portal
porter possum post poster pot potato potter pounce pour powder prairie praise press pretty pretzel prime
prince print prism prize profit promise prophet prose proton proud prove prune pudding puffin pull pulley
pulse puma pump pumpkin punt pupil puppet purple purse push puzzle pyramid python quack quail quaint
quantum quark quarry quarter quartz queen quest quick quiet quilt quince quota rabbit raccoon race racket
radar radio radish radium radius raft rain rainbow raise raisin rake ram rampart ranch random ranger rapid
rapids rare rat rate ratio rattle raven ravine reach ready reason rebel recipe record red redwood reef
referee regal relax relay relic remedy rental reply report rescue resort rest return reward rhyme ribbon
rice rich riddle ride rider ridge ring rinse risotto river road roam roar robe robin robot rock rocket
rocky rodeo rogue roll rooster rope rose rosy rotor round route rover rowing royal rub rubber ruby rudder
rugby rugged rule ruler rumba rush rust rustic rusty sack saddle safe saffron saga sage sail sailing
sailor saint salad salmon salon salsa salt salty samba sample sand sandal sander sandy sardine sari satin
sauce sauna sausage savanna save savvy saw scale scallop scarf scarlet scatter scene scheme scholar school
scone scoop scooter scope score scout screw scribe script scrub seagull seal search season secret sector
sensor sequel sequoia server sesame session settle sew shadow shady shake shanty shark sharp shave shawl
shed sheep shelf shelter sherbet sheriff shield shine shiny ship shirt shiver shoal shoe shop shore short
shout shovel shrew shrimp shy sickle sierra sieve sigh signal silent silicon silk silky silly silo silver
simple sing singer sip siren sitar skate skater skating sketch ski skid skiing skill skillet skip skirt
skunk sky slate sled sleek sleep sleepy sleuth slide slim slip slipper slogan slope sloth slug smart smell
smile smoke smooth snail snake sneaker sneeze sniff snipe snore snow snowy snug soak soccer sock socket
sodium sofa soft soil solar soldier solid solo sonata sonnet sorbet sorrel sort sound soup sour source
spade spanner spark sparrow spatula spell sphere spice spicy spider spiffy spill spin spinach spiral spire
splash sponge spoon sport spot spotty spray spring sprint sprout spruce square squash squeak squeeze squid
squire stable stack stadium stamp staple stapler star stare start station statue status steer step steppe
stereo stew sticker stir stitch stock stomp stone stool store stork storm stormy story stove strait strand
strap stream street stretch string stripe stroll strong student studio stuff sturdy style subway sugar
suit sumac summer summit sun sunday sunny sunset super supper supply surf surfer surfing survey sushi
swamp swan sweater sweep sweet swift swim swing swirl switch symbol syrup system table tablet taco tadpole
tahini tailor talent talk tall tame tan tango tangy tansy tap target tart taste tasty tavern taxi tea
teach teacher teal teapot teddy temple tempo tender tennis tensor tent termite terrace thank thaw theme
theory thesis thick thistle thorn thread throw thrush thunder thyme tick ticket tickle tide tidy tie tiger
tile timber time tin tiny tip titan toad toast toaster toasty toffee tofu toga token tomato tonic top
topaz topic torch toss total toucan touch tough tour tourist tow towel tower town toy trace track tractor
trade trail train tram trance travel tray treaty tremble trend tribe trick troll trophy tropic trot trout
trowel truck true truffle trumpet trust trusty try tuba tube tuesday tug tulip tumble tuna tundra tune
tunic tunnel turban turbo turkey turn turnip turret turtle tutor tuxedo twin twirl twist tycoon type umber
umpire uniform union unit unite unlock untie upbeat upper uranium urban urchin usher utensil vacuum vale
valley valve van vanish vapor vase vast vault vector velvet venue verse vertex vessel vest video viking
villa vine viola violet violin viper virtue visa vision visit visor vista vital vivid vocal voice volt
volume voter voyage wade wafer waffle wagon wait walk wallet walnut walrus waltz wand wander warden warm
warn wash wasp watch water watt wave wavy wealth weasel weaver wedge whale wheat wheel whirl whisk white
widget wig wiggle wild willow wind window windy wink winner winter wire wiry wisdom wise wish witty wizard
wobble wok wolf wombat wonder wood woolly work worm wrap wren wrench write writer xenon yacht yak yank
yard yarn yawn yell yellow yeoman yew yodel yoga young yoyo zany zeal zebra zenith zesty zigzag zinc
zinnia zip zipper zippy zone zoom
"""
WORDS: Final[tuple[str, ...]] = tuple(_WORD_TEXT.split())
_WORD_SET: Final = frozenset(WORDS)
CODE_BITS: Final = WORDS_PER_CODE * math.log2(len(WORDS))  # the secret part; the slot is public
