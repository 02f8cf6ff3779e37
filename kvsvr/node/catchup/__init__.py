"""The mechanisms of catching up, one module each (wired by
`kvsvr.node.replication`): the collaborators they share (`context`), failure
detection and hellos (`liveness`), hinted handoff (`hints`), anti-entropy
and purges (`anti_entropy`), and how a node starts and rebuilds (`rebuild`).
"""
