"""How long a request waited before it reached the replica, from the ``X-Request-Start`` header.

A latency objective is the client's: it counts the time a request spends in front of the replica
(a load balancer, Ray Serve's proxy and router) as well as in it. The replica cannot see that time
unless the front end stamps it. ``X-Request-Start`` is the common convention for that stamp (nginx
``proxy_set_header X-Request-Start "t=${msec}"``; Heroku's router): the time the request entered
the front end, in seconds, milliseconds or microseconds since the Unix epoch, optionally prefixed
by ``t=``. The clocks of the front end and the replica must agree (one machine, or NTP).
"""

from __future__ import annotations

HEADER = "x-request-start"
MAX_UPSTREAM_S = 60.0  # an older stamp is a wrong clock or a replayed header, not a queue


def upstream_wait_ms(header: str | None, now_s: float) -> float:
    """Milliseconds between the front end's stamp and ``now_s`` (``time.time()``), 0 without one.

    Stamps that cannot be parsed, lie in the future (clock skew) or are more than a minute old
    are ignored (0): a bad header must not make the replica refuse or reorder requests.
    """
    if not header:
        return 0.0
    text = header.strip()
    text = text[2:] if text.startswith("t=") else text
    try:
        stamp = float(text)
    except ValueError:
        return 0.0
    if stamp > 1e14:  # microseconds
        stamp /= 1e6
    elif stamp > 1e11:  # milliseconds
        stamp /= 1e3
    waited = now_s - stamp
    return waited * 1000 if 0 <= waited <= MAX_UPSTREAM_S else 0.0
