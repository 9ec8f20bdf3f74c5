"""MediaPolicy: every refusal, checked addresses on every redirect hop, pinned connections, caps, deadlines.

Servers run on loopback inside each test (127.0.0.2 plays an allowed host, 127.0.0.1 the internal
one that must stay unreachable) and are stopped by it. Refused requests must never reach a server.
"""

from __future__ import annotations

import base64
import io
import os
import time

import numpy as np
import pytest

from q3vl import Embedder, MediaPolicy
from q3vl.errors import InputError, QueryError
from q3vl.preprocess import fetch as fetch_mod
from q3vl.preprocess.image import probe_image
from q3vl.preprocess.media import Deadline, MediaAccess, media_call
from tests.conftest import noise_image
from tests.hostile import HostileServer, drip, lying_length, redirect, serve, silent

ALLOWED = "127.0.0.2"
ALLOW = MediaPolicy(allowed_networks=(f"{ALLOWED}/32",))


def png_bytes(h: int = 64, w: int = 64, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    noise_image(h, w, seed).save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()


def fetch_image(ref, policy: MediaPolicy = ALLOW, timeout: float = 10.0):
    return probe_image(ref, MediaAccess(policy, timeout))


def refusal(ref, policy: MediaPolicy = ALLOW) -> str:
    with pytest.raises(InputError) as err:
        fetch_image(ref, policy)
    return str(err.value)


# ---------------------------------------------------------------- addresses
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "10.1.2.3", "172.16.0.1", "192.168.1.1",
                                  "169.254.169.254", "224.0.0.1", "0.0.0.0", "[::ffff:127.0.0.1]", "100.64.0.1",
                                  "2130706433", "0x7f.1", "[fe80::1]", "[fc00::1]", "[2002:7f00:1::]"])
def test_non_public_addresses_are_refused_before_connecting(host):
    t = time.monotonic()
    msg = refusal(f"http://{host}:9/cat.png", MediaPolicy())
    assert "refused by the media policy" in msg and "not a public address" in msg
    assert time.monotonic() - t < 2


# IPv6 spellings of non-public IPv4 hosts, and IPv6 ranges that never name a public host
IPV6_REFUSED = ["::127.0.0.1", "::7f00:1", "::10.0.0.1", "::8.8.8.8",  # IPv4-compatible (::/96)
                "::ffff:0:127.0.0.1", "::ffff:0:a9fe:a9fe", "::ffff:0:8.8.8.8",  # IPv4-translated (::ffff:0:0:0/96)
                "64:ff9b::169.254.169.254", "64:ff9b::127.0.0.1", "64:ff9b::10.1.2.3",  # NAT64, private IPv4
                "64:ff9b:1::a9fe:a9fe", "64:ff9b:1:a9fe:a9:fe00::", "64:ff9b:1::8.8.8.8",  # local-use NAT64
                "fec0::1", "fed0::a9fe:a9fe", "feff:ffff::1"]  # site-local (fec0::/10)


@pytest.mark.parametrize("ip", IPV6_REFUSED)
def test_ipv6_forms_of_private_hosts_are_refused(ip):
    """Checked at the policy function (`address_allowed` is what every fetch hop asks), so no fetch runs."""
    for policy in (MediaPolicy(), MediaPolicy.strict(), MediaPolicy.strict(allowed_hosts=("example.com",))):
        assert not policy.address_allowed(ip), (ip, policy)
    assert MediaPolicy.trusted().address_allowed(ip)  # allow_private_networks lets everything through


def test_ipv6_public_and_explicitly_allowed_forms_pass():
    p = MediaPolicy()
    assert p.address_allowed("64:ff9b::8.8.8.8")  # NAT64 of a public IPv4: how IPv6-only hosts reach it
    assert p.address_allowed("2606:4700::1111") and p.address_allowed("2a00:1450:4001:82b::200e")
    q = MediaPolicy(allowed_networks=["10.0.0.0/8"])
    assert q.address_allowed("64:ff9b::10.1.2.3") and not q.address_allowed("64:ff9b::192.168.0.1")
    assert MediaPolicy(allowed_networks=["fec0::/10"]).address_allowed("fec0::1")


def test_address_rules():
    p = MediaPolicy()
    assert p.address_allowed("8.8.8.8") and p.address_allowed("2606:4700::1111")
    assert not p.address_allowed("127.0.0.1") and not p.address_allowed("::ffff:10.0.0.1")
    assert not p.address_allowed("ff02::1") and not p.address_allowed("::")
    q = MediaPolicy(allowed_networks=["10.0.0.0/8"])
    assert q.address_allowed("10.9.9.9") and not q.address_allowed("192.168.0.1")
    assert MediaPolicy.trusted().address_allowed("127.0.0.1")
    with pytest.raises(ValueError, match="CIDR"):
        MediaPolicy(allowed_networks=["not-a-net"])


def test_refused_port_open_or_closed_gives_the_same_text():
    with HostileServer({"/a.png": serve(PNG)}) as srv:
        open_port = refusal(srv.url("/a.png"), MediaPolicy())
        assert srv.hits == []
    closed_port = refusal(srv.url("/a.png"), MediaPolicy())
    assert open_port == closed_port


# ---------------------------------------------------------------- hosts and redirects
def test_allowed_host_is_fetched_and_equals_the_bytes():
    with HostileServer({"/a.png": serve(PNG)}, host=ALLOWED) as srv:
        img = fetch_image(srv.url("/a.png"))
    assert (img.width, img.height) == (64, 64) and img.source.data == PNG


def test_host_allowlist():
    policy = MediaPolicy(allowed_hosts=["images.example.com", ".cdn.example.org"], allow_private_networks=True)
    assert policy.host_allowed("IMAGES.example.com.") and policy.host_allowed("a.b.cdn.example.org")
    assert not policy.host_allowed("example.com") and not policy.host_allowed("evilcdn.example.org")
    with HostileServer({"/a.png": serve(PNG)}, host=ALLOWED) as srv:
        msg = refusal(srv.url("/a.png"), policy)
        assert srv.hits == []
    assert "host not in allowed_hosts" in msg


def test_redirect_from_an_allowed_host_to_loopback_is_refused():
    with HostileServer({"/secret": serve(b"internal")}) as internal, \
         HostileServer({"/a.png": redirect(internal.url("/secret"))}, host=ALLOWED) as outside:
        msg = refusal(outside.url("/a.png"))
        assert outside.hits == ["/a.png"] and internal.hits == []
    assert "refused by the media policy" in msg


def test_redirect_to_a_host_outside_the_allowlist_is_refused():
    policy = MediaPolicy(allowed_hosts=[ALLOWED], allowed_networks=["127.0.0.0/8"])
    with HostileServer({"/x": serve(PNG)}) as other, \
         HostileServer({"/a.png": redirect(other.url("/x"))}, host=ALLOWED) as first:
        assert "host not in allowed_hosts" in refusal(first.url("/a.png"), policy)
        assert other.hits == []


@pytest.mark.parametrize("location", ["file:///etc/passwd", "data:image/png;base64,AAAA", "ftp://127.0.0.2/x"])
def test_redirect_to_another_scheme_is_refused(location):
    with HostileServer({"/a.png": redirect(location)}, host=ALLOWED) as srv:
        assert "only http(s) URLs" in refusal(srv.url("/a.png"))


def test_redirect_limit_and_loop():
    routes = {f"/r{i}": redirect(f"/r{i + 1}") for i in range(6)} | {"/r6": serve(PNG), "/loop": redirect("/loop")}
    with HostileServer(routes, host=ALLOWED) as srv:
        assert fetch_image(srv.url("/r1")).width == 64  # five redirects: the default limit
        assert "more than 5 redirects" in refusal(srv.url("/r0"))
        t = time.monotonic()
        two = MediaPolicy(**{**vars_of(ALLOW), "max_redirects": 2})
        assert "more than 2 redirects" in refusal(srv.url("/loop"), two)
        assert time.monotonic() - t < 3 and len([h for h in srv.hits if h == "/loop"]) == 3


def vars_of(policy: MediaPolicy) -> dict:
    return {k: getattr(policy, k) for k in policy.__dataclass_fields__ if not k.startswith("_")}


def test_dns_answer_is_checked_once_and_the_checked_address_is_connected(monkeypatch):
    """A rebinding resolver answers an allowed address first and loopback after; only one lookup is made
    and the connection goes to the address that passed the check.
    """
    answers = iter([[ALLOWED], ["127.0.0.1"], ["127.0.0.1"]])
    calls = []

    def lookup(host, port):
        calls.append(host)
        return next(answers)

    monkeypatch.setattr(fetch_mod, "_lookup", lookup)
    with HostileServer({"/a.png": serve(PNG)}, host=ALLOWED) as good, \
         HostileServer({"/a.png": serve(b"internal")}, host="127.0.0.1", port=good.port) as internal:
        img = fetch_image(f"http://images.test:{good.port}/a.png")
        assert internal.hits == [] and good.hits == ["/a.png"]
    assert calls == ["images.test"] and img.source.data == PNG
    monkeypatch.setattr(fetch_mod, "_lookup", lambda host, port: ["127.0.0.1"])
    assert "not a public address" in refusal("http://images.test/a.png")


# ---------------------------------------------------------------- schemes, local files, data URIs
@pytest.mark.parametrize("url", ["ftp://127.0.0.2/a.png", "rtsp://127.0.0.2/stream", "gopher://x/1", "HTTPX://a/b"])
def test_other_url_schemes_are_refused(url):
    assert "unsupported URL scheme" in refusal(url)


def test_http_off():
    assert "http(s) URLs are refused" in refusal("http://127.0.0.2/a.png", MediaPolicy(allow_http=False))


def test_refused_local_files_look_the_same_whether_they_exist_or_not(tmp_path):
    existing = tmp_path / "there.png"
    existing.write_bytes(PNG)
    missing = tmp_path / "nothere.png"
    for policy in (MediaPolicy(allow_local=False), MediaPolicy(local_root=str(tmp_path / "root"))):
        a = refusal(str(existing), policy).replace(str(existing), "<path>")
        b = refusal(str(missing), policy).replace(str(missing), "<path>")
        assert a == b and "refused by the media policy" in a
    off = MediaPolicy(allow_file_uri=False)
    a = refusal("file://" + str(existing), off).replace(str(existing), "<path>")
    assert a == refusal("file://" + str(missing), off).replace(str(missing), "<path>")


def test_local_root_confines_paths_after_resolving_symlinks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "in.png").write_bytes(PNG)
    (outside / "out.png").write_bytes(PNG)
    (root / "link.png").symlink_to(outside / "out.png")
    (root / "inner-link.png").symlink_to(root / "in.png")
    (root / "dir-link").symlink_to(outside)
    policy = MediaPolicy(local_root=str(root))
    assert fetch_image(str(root / "in.png"), policy).width == 64
    assert fetch_image(str(root / "inner-link.png"), policy).width == 64
    for bad in (root / "link.png", root / "dir-link" / "out.png", root / ".." / "outside" / "out.png",
                outside / "out.png", "/etc/passwd"):
        assert "not inside the allowed media root" in refusal(str(bad), policy)
    assert "image file not found" in refusal(str(root / "missing.png"), policy)  # allowed, so it may say so


def test_data_uris():
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert fetch_image(uri).width == 64
    assert "data: URIs are refused" in refusal(uri, MediaPolicy(allow_data_uri=False))
    assert "larger than the 1000-byte per-item limit" in refusal(uri, MediaPolicy(max_item_bytes=1000))


def test_strict_preset_refuses_local_files_and_private_networks(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    strict = MediaPolicy.strict()
    assert "local file access is refused" in refusal(str(tmp_path / "a.png"), strict)
    assert "file:// URIs are refused" in refusal("file://" + str(tmp_path / "a.png"), strict)
    assert "not a public address" in refusal("http://127.0.0.1:9/a.png", strict)
    assert fetch_image(PNG, strict).width == 64  # bytes and data URIs are fine


# ---------------------------------------------------------------- sizes and time
def test_per_item_byte_cap_over_http():
    small = MediaPolicy(**{**vars_of(ALLOW), "max_item_bytes": 4000})
    big = png_bytes(128, 128)
    assert len(big) > 4000
    with HostileServer({"/big.png": serve(big), "/lie": lying_length()}, host=ALLOWED) as srv:
        assert "larger than" in refusal(srv.url("/big.png"), small)
        t = time.monotonic()
        assert "larger than the byte limit" in refusal(srv.url("/lie"))  # refused on the header
        assert time.monotonic() - t < 2


def test_per_call_byte_cap_and_one_fetch_per_call():
    policy = MediaPolicy(**{**vars_of(ALLOW), "max_call_bytes": len(PNG) * 2 + 10})
    with HostileServer({f"/{i}.png": serve(PNG) for i in range(3)}, host=ALLOWED) as srv:
        with media_call(policy):
            access = MediaAccess.current(policy, 10.0)
            for _ in range(3):  # the same URL again: served from the call's cache, charged once
                probe_image(srv.url("/0.png"), access)
            probe_image(srv.url("/1.png"), access)
            with pytest.raises(InputError, match="per-call limit"):
                probe_image(srv.url("/2.png"), access)
        assert srv.hits == ["/0.png", "/1.png", "/2.png"]


@pytest.mark.parametrize("route", ["body", "headers", "silent"])
def test_one_deadline_for_the_whole_fetch(route):
    """One byte every 2 s never trips a 10 s socket timeout; the 1 s item deadline still ends the fetch at
    1 s (the watchdog shuts the socket: the read does not wait for the next byte).
    """
    routes = {"/body": drip(2.0), "/headers": drip(2.0, headers_too=True), "/silent": silent()}
    policy = MediaPolicy(**{**vars_of(ALLOW), "deadline": 1.0})
    with HostileServer(routes, host=ALLOWED) as srv:
        t = time.monotonic()
        msg = refusal(srv.url(f"/{route}"), policy)
        elapsed = time.monotonic() - t
    assert "did not finish within the media deadline" in msg and elapsed < 1.8


def test_deadline_object():
    d = Deadline(0.05)
    d.check("x")
    time.sleep(0.06)
    with pytest.raises(InputError, match="x did not finish within the media deadline"):
        d.check("x")


# ---------------------------------------------------------------- in a batch of good items
GOOD = [{"text": "fine"}, {"image": noise_image(64, 64)}]


@pytest.fixture(scope="module")
def allowing_embedder(tiny_embedding_bundle):
    return Embedder(tiny_embedding_bundle, media_policy=MediaPolicy(**{**vars_of(ALLOW), "deadline": 1.5}))


@pytest.fixture(scope="module")
def clean(allowing_embedder):
    return allowing_embedder.process(GOOD)


def assert_only_that_item_fails(model, bad, clean, match, bound_s=6.0):
    items = [GOOD[0], bad, GOOD[1]]
    t = time.monotonic()
    with pytest.raises(InputError, match=match) as err:
        model.process(items)
    assert err.value.index == 1
    got = model.process(items, on_error="skip")
    assert time.monotonic() - t < bound_s
    assert np.isnan(got[1]).all() and np.abs(got[[0, 2]] - clean).max() <= 1e-6


def test_refusals_in_a_batch(allowing_embedder, clean, tmp_path):
    with HostileServer({"/slow": drip(0.3), "/internal": serve(PNG)}) as internal, \
         HostileServer({"/to-internal": redirect(internal.url("/internal")), "/slow": drip(0.3)},
                       host=ALLOWED) as outside:
        for bad, match in [({"image": internal.url("/internal")}, "not a public address"),
                           ({"image": outside.url("/to-internal")}, "not a public address"),
                           ({"image": outside.url("/slow")}, "media deadline"),
                           ({"video": outside.url("/slow")}, "media deadline"),
                           ({"video": [GOOD[1]["image"], outside.url("/slow")]}, "media deadline"),
                           ({"image": "ftp://127.0.0.2/x.png"}, "unsupported URL scheme")]:
            assert_only_that_item_fails(allowing_embedder, bad, clean, match)
        assert internal.hits == []


def test_local_refusal_in_a_batch(tiny_embedding_bundle, tmp_path):
    noise_image(64, 64).save(tmp_path / "a.png")
    model = Embedder(tiny_embedding_bundle, media_policy=MediaPolicy.strict())
    assert_only_that_item_fails(model, {"image": str(tmp_path / "a.png")}, model.process(GOOD),
                                "local file access is refused")
    assert os.path.exists(tmp_path / "a.png")


def test_a_stalled_query_url_is_fetched_once_per_call(tiny_reranker_bundle):
    """The reranker plans the query with every document; the call's fetch cache makes that one request."""
    from q3vl import Reranker

    rr = Reranker(tiny_reranker_bundle, media_policy=MediaPolicy(**{**vars_of(ALLOW), "deadline": 1.5}))
    with HostileServer({"/slow.png": drip(0.3), "/q.png": serve(PNG)}, host=ALLOWED) as srv:
        docs = [{"text": f"doc {i}"} for i in range(4)]
        t = time.monotonic()
        with pytest.raises(QueryError, match="^query: fetching .* did not finish within the media deadline"):
            rr.process({"query": {"image": srv.url("/slow.png")}, "documents": docs}, on_error="skip")
        assert time.monotonic() - t < 3.5
        good = rr.process({"query": {"image": srv.url("/q.png")}, "documents": docs})
        assert srv.hits == ["/slow.png", "/q.png"] and not np.isnan(good).any()


def test_same_bytes_or_data_uri_are_charged_once_per_call():
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    policy = MediaPolicy(max_call_bytes=len(PNG) * 2)
    with media_call(policy):
        access = MediaAccess.current(policy, 10.0)
        for _ in range(5):
            probe_image(uri, access)
            probe_image(PNG, access)
        with pytest.raises(InputError, match="per-call limit"):
            probe_image(png_bytes(64, 64, seed=1), access)


def test_a_failed_query_load_is_remembered_for_every_pair():
    """Every pair of a rerank call shares the query's media: after the first failure the others get
    the same QueryError at once instead of loading (fetching) again.
    """
    from q3vl.preprocess.encode import SharedMedia

    calls = []

    def load(media):
        calls.append(media)
        raise OSError("broken pixels")

    shared = SharedMedia([], load)
    for _ in range(3):
        with pytest.raises(QueryError, match="^query: broken pixels"):
            shared.blocks()
    assert len(calls) == 1
