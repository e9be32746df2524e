"""Server-side time of one append transaction's statements on MariaDB.

Run after a cluster bench run has left its tables in `stacker_bench`:

    python3 append_statements_profile.py 230 old    # CASE over OR-ed keys (before 93d422d)
    python3 append_statements_profile.py 230 join   # cursors by a join (93d422d)
    python3 append_statements_profile.py 230 trip   # seqs read by the statements (tried, not kept)
    mysql -h127.0.0.1 -uroot stacker_bench < /tmp/tx2-join.sql

It writes a transaction of N messages over the bench's room members
(seeded, so each mode gets the same batch), rolled back at the end, with
SHOW PROFILES after it. The 'join' mode uses UNION ALL ... JOIN; the
store's statement adds STRAIGHT_JOIN, which gives the same plan.
"""
import subprocess,random,sys
def q(sql): return subprocess.run(['mysql','-h127.0.0.1','-uroot','-N','stacker_bench','-e',sql],capture_output=True,text=True).stdout
mem=[tuple(map(int,l.split())) for l in q("select room_id,user_id from room_members").split('\n') if l]
random.seed(1)
N=int(sys.argv[1]); mode=sys.argv[2]
msgs=[random.choice(mem) for _ in range(N)]
by={}
for i,(r,u) in enumerate(msgs): by.setdefault(r,[]).append((i,u))
rooms=sorted(by)
content="_utf8mb4 X'"+('41'*64)+"'"
base=10**15+random.randint(0,10**12)
stm=["SET profiling=1","SET profiling_history_size=100","BEGIN"]
case=' '.join(f"WHEN {r} THEN {len(by[r])}" for r in rooms); ids=','.join(map(str,rooms))
stm.append(f"UPDATE rooms SET last_seq = last_seq + CASE id {case} END WHERE id IN ({ids})")
rows=[];cur={}
for r in rooms:
    n=len(by[r])
    for k,(i,u) in enumerate(by[r]):
        rows.append((base+i,r,n-1-k,u,1000000+k)); cur[(r,u)]=(n-1-k,1000000+k)
for c in range(0,len(rows),100):
    ch=rows[c:c+100]
    if mode=='trip':
        ua=' UNION ALL '.join(f"SELECT {i} AS id, {r} AS room_id, {b} AS back, {u} AS sender_id, NULL AS cid, {content} AS content, 1 AS created_at" for (i,r,b,u,s) in ch)
        stm.append(f"INSERT INTO messages (id, room_id, seq, sender_id, client_msg_id, content, created_at, flags) SELECT v.id, v.room_id, r.last_seq - v.back, v.sender_id, v.cid, v.content, v.created_at, 0 FROM ({ua}) v JOIN rooms r ON r.id = v.room_id")
    else:
        stm.append("INSERT INTO messages (id, room_id, seq, sender_id, client_msg_id, content, created_at, flags) VALUES "+','.join(f"({i},{r},{s},{u},NULL,{content},1,0)" for (i,r,b,u,s) in ch))
items=sorted(cur.items())
for c in range(0,len(items),150):
    ch=items[c:c+150]
    if mode=='old':
        case=' '.join(f"WHEN room_id = {r} AND user_id = {u} THEN {s}" for (r,u),(b,s) in ch)
        cond=' OR '.join(f"(room_id = {r} AND user_id = {u})" for (r,u),(b,s) in ch)
        stm.append(f"UPDATE room_members SET read_seq = GREATEST(read_seq, CASE {case} ELSE read_seq END) WHERE {cond}")
    elif mode=='join':
        ua=' UNION ALL '.join(f"SELECT {r} AS r, {u} AS u, {s} AS s" for (r,u),(b,s) in ch)
        stm.append(f"UPDATE room_members m JOIN ({ua}) v ON m.room_id = v.r AND m.user_id = v.u SET m.read_seq = GREATEST(m.read_seq, v.s)")
    else:
        ua=' UNION ALL '.join(f"SELECT {r} AS r, {u} AS u, {b} AS back" for (r,u),(b,s) in ch)
        stm.append(f"UPDATE room_members m JOIN ({ua}) v ON m.room_id = v.r AND m.user_id = v.u JOIN rooms r ON r.id = v.r SET m.read_seq = GREATEST(m.read_seq, r.last_seq - v.back)")
if mode=='trip': stm.append(f"SELECT count(*) FROM rooms WHERE id IN ({ids})")
stm.append("ROLLBACK")
open(f'/tmp/tx2-{mode}.sql','w').write(';\n'.join(stm)+';\nSHOW PROFILES;\n')
