"""The policy the real-server tests run with, and edits of it for hot-reload tests."""

SERVER_POLICY = """\
service: inventory
inbound:
  authentication: strict
  public: [/healthz]
  authorization:
    rules:
      - name: no-admin
        action: deny
        paths: [/admin/*]
      - name: orders-reserve
        action: allow
        from: [orders]
        methods: [POST]
        paths: [/reserve]
      - name: reads
        action: allow
        from: ["*"]
        methods: [GET]
  faults:
    - name: chaos
      match: {headers: {x-chaos: {values: ["on"]}}}
      abort: {status: 503, percent: 100}
    - name: slow
      match: {paths: [/slow]}
      delay: {duration: 1s, percent: 100}
"""

LOCKED_DOWN_POLICY = """\
service: inventory
inbound:
  authentication: strict
  public: [/healthz]
  authorization:
    rules:
      - name: lockdown
        action: deny
        paths: ["*"]
"""

BROKEN_POLICY = """\
service: inventory
inbound:
  authentication: strict
  authorization:
    rules:
      - name: typo
        actoin: deny
"""
