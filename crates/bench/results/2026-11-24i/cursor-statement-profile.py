import subprocess,random,statistics,sys
q=lambda s:subprocess.run(["mysql","-uroot","-h127.0.0.1","stacker_bench","-N","-e",s],capture_output=True,text=True)
allrooms=q("SELECT id FROM rooms ORDER BY id").stdout.split()
mem=[l.split() for l in q("SELECT room_id,user_id FROM room_members").stdout.strip().split("\n")]
m={}
for r,u in mem: m.setdefault(r,u)
def stmt(kind,rooms):
    if kind=='union':
        cur=" UNION ALL ".join(f"SELECT {r} AS room_id, {m[r]} AS user_id, 5 AS seq" for r in rooms)
        return f"UPDATE ({cur}) c STRAIGHT_JOIN room_members m ON m.room_id = c.room_id AND m.user_id = c.user_id SET m.read_seq = GREATEST(m.read_seq, c.seq)"
    case=" ".join(f"WHEN room_id = {r} AND user_id = {m[r]} THEN 5" for r in rooms)
    cond=" OR ".join(f"(room_id = {r} AND user_id = {m[r]})" for r in rooms)
    return f"UPDATE room_members SET read_seq = GREATEST(read_seq, CASE {case} ELSE read_seq END) WHERE {cond}"
for n in [int(x) for x in sys.argv[1:]]:
    res={'union':[], 'case':[]}
    for rep in range(12):
        qs=[]
        order=[]
        for kind in (['union','case','case','union'] if rep%2 else ['case','union','union','case']):
            qs.append(stmt(kind,sorted(random.sample(allrooms,n)))); order.append(kind)
        out=q("SET profiling=1;\nBEGIN;\nINSERT INTO warm VALUES (1);\n"+";\n".join(qs)+";\nROLLBACK;\nSHOW PROFILES;")
        lines=[l.split("\t") for l in out.stdout.split("\n") if l and l.split("\t")[0].isdigit() and len(l.split("\t"))==3]
        ups=[float(t)*1000 for _,t,qq in lines if qq.startswith("UPDATE")]
        for k,v in zip(order,ups): res[k].append(v)
    print(n, {k:"%.3f"%statistics.median(v) for k,v in res.items()})
