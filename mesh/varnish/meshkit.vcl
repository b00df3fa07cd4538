vcl 4.1;
#
# meshkit's cache tier: Varnish 7.1 between the ingress Envoy (which ring-hashes POSTs on x-body-hash
# onto N of these) and the embedding backend. Runs as is: `varnishd -f meshkit.vcl -a :6081 ...`.
#
# OPERATOR NOTES
#
# Settings. Everything an operator sets is in the block between the two "meshkit settings" lines
# below: the backend, the PURGE ACL, the POST body limit, the default TTL and grace. Edit it by hand,
# or render it: `meshkit.render.meshkit_vcl(backend=("10.0.0.5", 8080), purgers=("10.0.0.0/8",),
# ttl=3600, grace=86400, max_body_bytes=1 << 20)` returns this file with the block rewritten (values
# checked). Varnish resolves the backend host when the VCL compiles: give an address or a name this
# machine resolves (a Kubernetes Service name in the pod).
#
# What is cached.
# - POST: only with a non-empty X-Body-Hash (meshkit's body-hash filter sets it at the ingress and
#   drops any value a client sent). Key: URL + Host without its port + method + X-Body-Hash (so a
#   PURGE or a request sent straight to a pod on another port finds the same object). On a miss the
#   backend gets a POST with the whole body (std.cache_req_body; the method is restored in
#   vcl_backend_fetch, Varnish would send a GET). A body over the limit (1 MiB), or a POST without
#   Content-Length (chunked), is passed whole, never buffered or cut.
# - POST without X-Body-Hash, or an empty one: pass.
# - /v1/chat/completions, /v1/completions, /v1/responses: generated answers are reused only when the
#   request opts in with `X-Cache-Chat: on` (set it on the ingress route that wants it, or let a
#   caller that sends temperature 0 ask for it). Without it: pass. A streamed answer (SSE) is cached
#   whole and replayed as the same bytes, the same events; its `Cache-Control: no-cache` (what SSE
#   servers send against buffering proxies) does not stop that, private/no-store do.
# - GET/HEAD: Varnish's usual behaviour (key URL + Host without port; Authorization or Cookie: pass).
# - /healthz, /readyz, /metrics: never cached (pass), whatever the method.
# - Authorization and Cookie on a cacheable POST: Cookie is removed (an API answer does not depend on
#   it, and cookies would leak into the shared cache key space); Authorization is kept, forwarded to
#   the backend on a miss, and NOT part of the key. The ingress has already authenticated and
#   authorised the caller (the auth filter runs before anything reaches Varnish), and an embedding of
#   the same body with the same model is the same answer whoever asks. A backend whose answers do
#   depend on the caller must say so: `Cache-Control: private` (not cached) or
#   `Vary: Authorization` (one object per caller), both honoured.
#
# What is never stored: status >= 400 (5xx included: a revalidation that gets a 5xx keeps serving the
# stale object instead), Set-Cookie, Cache-Control private/no-store/no-cache, Surrogate-Control
# no-store, Vary: *. Those get a short hit-for-miss marker, so requests still reach the backend and
# are not queued behind each other.
#
# Lifetimes. TTL 1 h and grace 24 h (serve stale while one background fetch revalidates) when the
# backend says nothing. Per response the backend decides with Cache-Control max-age / s-maxage (TTL)
# and stale-while-revalidate (grace), or Expires; the defaults are in the settings block.
#
# PURGE (one entry point; the purge broadcaster sends these to every pod):
#   PURGE /path                       every object of that exact URL (every body variant, any host:
#                                     a ban on the URL stored with each object, since the key also
#                                     holds the body hash)
#   PURGE / + X-Purge-All: true       everything
#   PURGE / + Surrogate-Key: k1 k2    every object whose backend response carried a Surrogate-Key
#                                     header naming any of k1, k2 (space-separated). Keys must be
#                                     [A-Za-z0-9_.-]+: anything else (regex characters, quotes, tabs)
#                                     is 400 and purges nothing; a '.' matches only a '.'.
#   Answers 200 JSON once the ban is in place (std.ban; a ban that fails to compile is a 500, never a
#   silent 200). X-Purge-All and Surrogate-Key together: 400. A URL with characters outside RFC 3986's
#   path/query set: 400.
#   Only from client addresses in `acl meshkit_purgers` (loopback by default; the TCP peer, never
#   X-Forwarded-For): others get 403 JSON. Behind Envoy every client is Envoy's address, so the
#   ingress must refuse PURGE itself (meshkit's rendered ingress answers 405) and Varnish must only
#   be reachable from Envoy and the broadcaster.
#
# Responses carry X-Cache: HIT | MISS | PASS and, for a hashed request, X-Body-Hash. The URL stored
# for path purges and the Surrogate-Key tags are removed from responses.
#
# Headers named X-Meshkit-* are this file's own scratch space: a client's are removed on arrival.

import std;

# ==== meshkit settings: begin ====
backend default {
    .host = "127.0.0.1";
    .port = "8080";
    .first_byte_timeout = 300s;
    .between_bytes_timeout = 300s;
}

acl meshkit_purgers {
    "127.0.0.1";
    "::1";
}

sub meshkit_settings_recv {
    # POST bodies up to this many bytes are buffered and cached; bigger ones pass whole.
    set req.http.X-Meshkit-Body-Limit = "1048576";
}

sub meshkit_default_ttl {
    set beresp.ttl = 3600s;
}

sub meshkit_default_grace {
    set beresp.grace = 86400s;
}

sub meshkit_pick_backend {
    # One backend serves every path. For generated answers (chat, completions, responses) from
    # another one, declare it above and set it here: `set req.backend_hint = generated;`
}
# ==== meshkit settings: end ====

sub vcl_recv {
    unset req.http.X-Meshkit-Post;
    unset req.http.X-Meshkit-Pass;
    unset req.http.X-Meshkit-Keys;
    unset req.http.X-Meshkit-Error;
    unset req.http.X-Meshkit-Purged;
    unset req.http.X-Meshkit-Body-Limit;

    if (req.method == "PURGE") {
        call meshkit_purge;
    }

    call vcl_req_host;
    call meshkit_pick_backend;
    if (req.url ~ "^/(healthz|readyz|metrics)([/?]|$)") {
        set req.http.X-Meshkit-Pass = "health and metrics are never cached";
        return (pass);
    }
    if (req.method == "POST") {
        call meshkit_post;
    }
    # Not reached by a POST. GET/HEAD and the rest: the built-in rules (cached unless Authorization or
    # Cookie; other methods pass or pipe).
}

sub meshkit_post {
    if (req.http.X-Body-Hash !~ ".") {
        set req.http.X-Meshkit-Pass = "no X-Body-Hash";
        return (pass);
    }
    if (req.url ~ "^/v1/(chat/completions|completions|responses)([?]|$)" && req.http.X-Cache-Chat != "on") {
        set req.http.X-Meshkit-Pass = "generated answers are cached only with X-Cache-Chat: on";
        return (pass);
    }
    call meshkit_settings_recv;
    if (std.integer(req.http.Content-Length, -1) < 0 ||
        std.integer(req.http.Content-Length, -1) > std.integer(req.http.X-Meshkit-Body-Limit, 0)) {
        unset req.http.X-Meshkit-Body-Limit;
        set req.http.X-Meshkit-Pass = "body without Content-Length or over the limit";
        return (pass);
    }
    # Content-Length checked first: over std.cache_req_body's limit Varnish would drop the connection.
    if (!std.cache_req_body(std.bytes(integer=std.integer(req.http.X-Meshkit-Body-Limit, 0)))) {
        set req.http.X-Meshkit-Error = "bad_request";
        return (synth(400, "the request body could not be read"));
    }
    unset req.http.X-Meshkit-Body-Limit;
    unset req.http.Cookie;
    set req.http.X-Meshkit-Post = "1";
    return (hash);  # skips the built-in Authorization/Cookie pass on purpose (see the notes on top)
}

sub meshkit_purge {
    if (client.ip !~ meshkit_purgers) {
        set req.http.X-Meshkit-Error = "forbidden";
        return (synth(403, "PURGE is not allowed from this address"));
    }
    if (req.http.X-Purge-All && req.http.Surrogate-Key) {
        set req.http.X-Meshkit-Error = "bad_request";
        return (synth(400, "send X-Purge-All or Surrogate-Key, not both"));
    }
    if (req.http.X-Purge-All) {
        if (req.http.X-Purge-All != "true") {
            set req.http.X-Meshkit-Error = "bad_request";
            return (synth(400, "X-Purge-All must be true"));
        }
        if (!std.ban("obj.status != 0")) {
            set req.http.X-Meshkit-Error = "ban_failed";
            return (synth(500, "the ban was refused: " + std.ban_error()));
        }
        set req.http.X-Meshkit-Purged = {"{"purged": "all""} + "}";
        return (synth(200, "Purged"));
    }
    if (req.http.Surrogate-Key) {
        std.collect(req.http.Surrogate-Key, " ");
        set req.http.X-Meshkit-Keys = req.http.Surrogate-Key;
        # Validated before anything reaches a ban expression: no regex, quote or white space but
        # the single spaces between keys (ban() splits on white space, even inside quotes).
        if (req.http.X-Meshkit-Keys !~ "^ *[A-Za-z0-9_.-]+( +[A-Za-z0-9_.-]+)* *$") {
            set req.http.X-Meshkit-Error = "bad_request";
            return (synth(400, "Surrogate-Key: space-separated keys of A-Z a-z 0-9 _ . - only"));
        }
        set req.http.X-Meshkit-Keys = regsuball(req.http.X-Meshkit-Keys, "^ +| +$", "");
        set req.http.X-Meshkit-Keys = regsuball(req.http.X-Meshkit-Keys, " +", " ");
        if (!std.ban("obj.http.Surrogate-Key ~ (^|[[:space:]])(" +
                regsuball(regsuball(req.http.X-Meshkit-Keys, "[.]", "[.]"), " ", "|") +
                ")($|[[:space:]])")) {
            set req.http.X-Meshkit-Error = "ban_failed";
            return (synth(500, "the ban was refused: " + std.ban_error()));
        }
        set req.http.X-Meshkit-Purged = {"{"purged": "surrogate-key", "keys": [""} +
            regsuball(req.http.X-Meshkit-Keys, " ", {"", ""}) + {""]}"};
        return (synth(200, "Purged"));
    }
    # Exact URL, compared as a string (==, no regex); the characters RFC 3986 allows in a path and
    # query, so nothing in it can end the ban's argument or the JSON string below.
    if (req.url !~ "^/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*$") {
        set req.http.X-Meshkit-Error = "bad_request";
        return (synth(400, "PURGE: the URL has characters outside RFC 3986"));
    }
    if (!std.ban("obj.http.X-Meshkit-Url == " + req.url)) {
        set req.http.X-Meshkit-Error = "ban_failed";
        return (synth(500, "the ban was refused: " + std.ban_error()));
    }
    set req.http.X-Meshkit-Purged = {"{"purged": "url", "url": ""} + req.url + {"""} + "}";
    return (synth(200, "Purged"));
}

sub vcl_pass {
    # Every pass comes here: this file's own, the built-in rules' (GET with Authorization or Cookie,
    # PUT, DELETE, ...) and hit-for-pass.
    if (!req.http.X-Meshkit-Pass) {
        set req.http.X-Meshkit-Pass = "pass";
    }
}

sub vcl_hash {
    hash_data(req.url);
    if (req.http.host) {
        # Without the port: a request straight to a pod, or a PURGE, finds what came through Envoy.
        hash_data(regsub(req.http.host, ":[0-9]+$", ""));
    } else {
        hash_data(server.ip);
    }
    if (req.http.X-Meshkit-Post) {
        hash_data("POST");
        hash_data(req.http.X-Body-Hash);
    }
    return (lookup);
}

sub vcl_backend_fetch {
    if (bereq.http.X-Meshkit-Post) {
        set bereq.method = "POST";  # a miss is fetched as GET otherwise (and the body dropped)
    }
    unset bereq.http.X-Meshkit-Post;
    unset bereq.http.X-Meshkit-Pass;
    unset bereq.http.X-Cache-Chat;
}

sub vcl_backend_response {
    # Stored with the object for path purges (a ban on the URL reaches every body variant) and for
    # the ban lurker (bans on obj.* only are evaluated in the background too).
    set beresp.http.X-Meshkit-Url = bereq.url;
    if (beresp.http.Surrogate-Key) {
        std.collect(beresp.http.Surrogate-Key, " ");
    }
    if (bereq.uncacheable) {
        return (deliver);  # a pass
    }
    if (beresp.status >= 500 && bereq.is_bgfetch) {
        return (abandon);  # keep serving the stale object through its grace
    }
    # A generated answer reaches this point only when the request opted in (X-Cache-Chat: on; any
    # other is a pass). Its stream's `Cache-Control: no-cache` is what every SSE server (OpenAI
    # included) sends so that proxies do not buffer it, not a statement about reuse: the opt-in wins.
    # private and no-store are still honoured.
    if (bereq.url ~ "^/v1/(chat/completions|completions|responses)([?]|$)" &&
        beresp.http.Content-Type ~ "(?i)^text/event-stream" &&
        beresp.http.Cache-Control !~ "(?i)(private|no-store)") {
        set beresp.http.X-Meshkit-Stream = "1";
    }
    if (beresp.status >= 400 ||
        beresp.http.Set-Cookie ||
        beresp.http.Cache-Control ~ "(?i)(private|no-store)" ||
        (beresp.http.Cache-Control ~ "(?i)no-cache" && !beresp.http.X-Meshkit-Stream) ||
        beresp.http.Surrogate-Control ~ "(?i)no-store" ||
        beresp.http.Vary == "*" ||
        beresp.ttl <= 0s) {
        unset beresp.http.X-Meshkit-Stream;
        set beresp.ttl = 120s;  # hit-for-miss: not stored, not coalesced
        set beresp.grace = 0s;
        set beresp.uncacheable = true;
        return (deliver);
    }
    unset beresp.http.X-Meshkit-Stream;
    if (beresp.http.Cache-Control !~ "(?i)(s-maxage|max-age)=" && !beresp.http.Expires) {
        call meshkit_default_ttl;
    }
    if (beresp.http.Cache-Control !~ "(?i)stale-while-revalidate=") {
        call meshkit_default_grace;
    }
    return (deliver);
}

sub vcl_backend_error {
    set beresp.http.Content-Type = "application/json";
    set beresp.body = {"{"error": {"message": "the cache's backend did not answer", "type": "backend_unavailable", "code": null}}
"};
    return (deliver);
}

sub vcl_deliver {
    if (req.http.X-Meshkit-Pass) {
        set resp.http.X-Cache = "PASS";
    } else if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
    if (req.http.X-Body-Hash ~ ".") {
        set resp.http.X-Body-Hash = req.http.X-Body-Hash;
    }
    unset resp.http.X-Meshkit-Url;
    unset resp.http.Surrogate-Key;
}

sub vcl_synth {
    set resp.http.Content-Type = "application/json";
    if (req.http.X-Meshkit-Purged) {
        set resp.body = req.http.X-Meshkit-Purged + {"
"};
        return (deliver);
    }
    # resp.reason is one of this file's own messages (no quotes) or Varnish's reason phrase.
    if (req.http.X-Meshkit-Error !~ ".") {
        set req.http.X-Meshkit-Error = "error";
    }
    set resp.body = {"{"error": {"message": ""} + regsuball(resp.reason, {"["\\[:cntrl:]]"}, "") +
        {"", "type": ""} + req.http.X-Meshkit-Error + {"", "code": null}}
"};
    return (deliver);
}
