import subprocess,random,statistics,sys,re
def psql(sql):
    return subprocess.run(["psql","-h","127.0.0.1","-U","postgres","-d","test","-qAt","-v","ON_ERROR_STOP=1"],input=sql,capture_output=True,text=True)
r=psql("""DROP TABLE IF EXISTS cur_bench; CREATE TABLE cur_bench (room_id BIGINT NOT NULL, user_id BIGINT NOT NULL, role BIGINT NOT NULL DEFAULT 0, nickname TEXT NOT NULL DEFAULT '', mute_until BIGINT NOT NULL DEFAULT 0, joined_at BIGINT NOT NULL DEFAULT 0, read_seq BIGINT NOT NULL DEFAULT 0, delivered_seq BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (room_id, user_id));
INSERT INTO cur_bench (room_id, user_id) SELECT r, u FROM generate_series(1,2000) r, generate_series(1,2) u; ANALYZE cur_bench;""")
assert r.returncode==0, r.stderr
def stmt(kind,pairs):
    if kind=='case':
        case=" ".join(f"WHEN room_id = {r} AND user_id = {u} THEN 5" for r,u in pairs)
        cond=" OR ".join(f"(room_id = {r} AND user_id = {u})" for r,u in pairs)
        return f"UPDATE cur_bench SET read_seq = GREATEST(read_seq, CASE {case} ELSE read_seq END) WHERE {cond}"
    vals=", ".join(f"({r}::BIGINT, {u}::BIGINT, 5::BIGINT)" for r,u in pairs)
    return f"UPDATE cur_bench m SET read_seq = GREATEST(m.read_seq, c.seq) FROM (VALUES {vals}) AS c(room_id, user_id, seq) WHERE m.room_id = c.room_id AND m.user_id = c.user_id"
for n in [int(x) for x in sys.argv[1:]]:
    res={'case':[], 'values':[]}
    for rep in range(12):
        order=['case','values','values','case'] if rep%2 else ['values','case','case','values']
        sql="\\timing on\nBEGIN;\nINSERT INTO cur_bench (room_id,user_id) VALUES (-1,-1);\n"
        for k in order:
            pairs=sorted(set((random.randint(1,2000),random.randint(1,2)) for _ in range(n)))
            sql+=stmt(k,pairs)+";\n"
        sql+="ROLLBACK;\n"
        out=psql(sql)
        ts=[float(x) for x in re.findall(r"Time: ([0-9.]+) ms",out.stdout)]
        # ts: BEGIN, INSERT, 4 updates, ROLLBACK
        for k,t in zip(order,ts[2:6]): res[k].append(t)
    print(n,{k:"%.3f"%statistics.median(v) for k,v in res.items()})
psql("DROP TABLE cur_bench")
