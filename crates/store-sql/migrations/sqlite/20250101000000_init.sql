-- Stacker schema, SQLite. Every integer is a 64-bit INTEGER (ids, seqs, Unix ms
-- times, role/policy/status codes, 0/1 booleans); strings are TEXT.

CREATE TABLE users (
    id            INTEGER NOT NULL PRIMARY KEY,
    username      TEXT    NOT NULL,
    nickname      TEXT    NOT NULL,
    password_hash TEXT    NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE UNIQUE INDEX users_username ON users (username);

CREATE TABLE rooms (
    id          INTEGER NOT NULL PRIMARY KEY,
    name        TEXT    NOT NULL,
    -- lower-cased name for case-insensitive search (Unicode-aware, done in Rust)
    name_lower  TEXT    NOT NULL,
    is_group    INTEGER NOT NULL,
    join_policy INTEGER NOT NULL,
    owner_id    INTEGER NOT NULL,
    direct_key  TEXT    NULL,
    last_seq    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);
CREATE UNIQUE INDEX rooms_direct_key ON rooms (direct_key);
CREATE INDEX rooms_group_created ON rooms (is_group, created_at);

CREATE TABLE room_members (
    room_id       INTEGER NOT NULL REFERENCES rooms (id),
    user_id       INTEGER NOT NULL REFERENCES users (id),
    role          INTEGER NOT NULL,
    nickname      TEXT    NOT NULL DEFAULT '',
    mute_until    INTEGER NOT NULL DEFAULT 0,
    joined_at     INTEGER NOT NULL,
    read_seq      INTEGER NOT NULL DEFAULT 0,
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, user_id)
) WITHOUT ROWID;
CREATE INDEX room_members_user ON room_members (user_id);

CREATE TABLE join_requests (
    id         INTEGER NOT NULL PRIMARY KEY,
    room_id    INTEGER NOT NULL REFERENCES rooms (id),
    user_id    INTEGER NOT NULL REFERENCES users (id),
    message    TEXT    NOT NULL,
    status     INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    decided_at INTEGER NULL
);
CREATE INDEX join_requests_room_status ON join_requests (room_id, status);
CREATE INDEX join_requests_user ON join_requests (user_id);

CREATE TABLE messages (
    id            INTEGER NOT NULL PRIMARY KEY,
    room_id       INTEGER NOT NULL REFERENCES rooms (id),
    seq           INTEGER NOT NULL,
    sender_id     INTEGER NOT NULL REFERENCES users (id),
    client_msg_id TEXT    NULL,
    content       TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    flags         INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX messages_room_seq ON messages (room_id, seq);
CREATE UNIQUE INDEX messages_sender_client ON messages (sender_id, client_msg_id);

-- Per-device delivery cursors (realtime push); no store trait method yet.
CREATE TABLE device_cursors (
    user_id    INTEGER NOT NULL,
    device_id  TEXT    NOT NULL,
    room_id    INTEGER NOT NULL,
    seq        INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id, room_id)
) WITHOUT ROWID;
