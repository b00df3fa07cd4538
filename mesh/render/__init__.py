"""The one place server configs are built: Envoy (front and bench upstream), nats-server, Varnish VCL.

The harness, `meshkit up`, `meshkit render`, the tests and the benchmark all get their configs here.
Envoy configs are Python structures written out as YAML with comments (`commented_yaml`); whatever a
filter needs from Envoy is derived from the chain's filter classes (`chain_needs`), and the defaults a
config shares with `meshkit extproc` are read from its options (`meshkit_defaults`).

    front_config          FrontConfig: the values of one ingress Envoy, checked, with what is derived
    envoy_front           the bootstrap: listener, route, clusters (one structure for every API)
    envoy_meshkit_filter  meshkit's filter block per API (ext_proc, ext_authz gRPC, ext_authz HTTP)
    envoy_local_replies   Envoy's own 413/500/504 with meshkit's JSON body
    envoy_timeouts        Envoy-side timeouts, always above meshkit's --filter-timeout
    envoy_direct          the benchmark's upstream: Envoy answering 200 itself
    nats_config           nats-server config (origin with JetStream, leaf)
    varnish_vcl           backend declarations inserted into a VCL program; meshkit's cache VCL
                          (mesh/varnish/meshkit.vcl) with its settings block set
    command               `meshkit render`
"""

from __future__ import annotations

from meshkit.extproc.apis import Api
from meshkit.render.chain_needs import ChainNeeds, needs_of
from meshkit.render.envoy_direct import upstream_direct
from meshkit.render.envoy_meshkit_filter import processing_mode
from meshkit.render.envoy_timeouts import above_filter_timeout, duration
from meshkit.render.front_config import FrontConfig
from meshkit.render.nats_config import nats_server_config
from meshkit.render.varnish_vcl import meshkit_vcl, vcl_with_backends

__all__ = [
    "Api",
    "ChainNeeds",
    "FrontConfig",
    "above_filter_timeout",
    "duration",
    "meshkit_vcl",
    "nats_server_config",
    "needs_of",
    "processing_mode",
    "upstream_direct",
    "vcl_with_backends",
]
