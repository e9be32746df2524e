-- The mute of a member who left or was removed while muted, put back if
-- they rejoin before it ends: leaving and rejoining must not undo a mute.
-- A row goes when the user rejoins (its mute is then on the member row).
CREATE TABLE room_mutes (
    room_id    BIGINT NOT NULL,
    user_id    BIGINT NOT NULL,
    mute_until BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
