-- The room's last seq when the member joined: where a device of the member
-- with no cursor of its own for the room starts, and below which no device
-- cursor reaches (messages from before a rejoin are not replayed). Existing
-- members start where their delivered cursor is, as before.
ALTER TABLE room_members ADD COLUMN joined_seq INTEGER NOT NULL DEFAULT 0;
UPDATE room_members SET joined_seq = delivered_seq;
