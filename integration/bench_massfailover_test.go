package integration

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
)

// BenchmarkMassFailover: one server owns every app (10,000 by default;
// BATON_BENCH_MASS=n for another count) and two others own none, on an
// embedded 3-member etcd, TTL 2 s. "crash": the owner is killed (its
// lease not revoked), so its keys go when etcd expires the lease and the
// two survivors take the orphans over as successors, in batches. "drain":
// the owner closes, handing every app to its successor. Reported: the
// time from the crash (or the start of Close) until the last app acts on a
// survivor, and that time ÷ (TTL + 1 s), the bound for a crash (≤
// 1 meets it). Run with -benchtime=1x.
func BenchmarkMassFailover(b *testing.B) {
	apps := 10000
	if v := os.Getenv("BATON_BENCH_MASS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			b.Fatalf("BATON_BENCH_MASS=%q: want a positive number of apps", v)
		}
		apps = n
	}
	e := testutil.Etcd(b, 3)
	bc := newBenchClusterOn(b, e, 0)
	ids := registerMany(b, bc, apps)
	for _, mode := range []string{"crash", "drain"} {
		b.Run(fmt.Sprintf("apps=%d/%s", apps, mode), func(b *testing.B) {
			bc.b = b
			for b.Loop() {
				owner := bc.addNode("127.0.0.1:0")
				electAll(b, []*server.Node{owner}, ids)
				bc.addNode("127.0.0.1:0")
				bc.addNode("127.0.0.1:0")
				bc.awaitMembers()
				survivors := bc.nodes[1:]
				start := time.Now()
				switch mode {
				case "crash":
					servertest.Crash(owner)
				case "drain":
					ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
					if err := owner.Close(ctx); err != nil {
						b.Errorf("drain: %v", err)
					}
					cancel()
				}
				took, err := allActOn(survivors, ids, start, 60*time.Second)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(took.Seconds(), "p100-acting-s")
				b.ReportMetric(took.Seconds()/(ttl+time.Second).Seconds(), "p100/(TTL+1s)")
				bc.wipe() // the next trial starts from an etcd with the registry only
			}
		})
	}
}

// allActOn waits until every app in ids acts on one of nodes, and returns
// how long that took from start.
func allActOn(nodes []*server.Node, ids []int64, start time.Time, timeout time.Duration) (time.Duration, error) {
	for {
		acting := 0
		for _, n := range nodes {
			acting += len(n.Elector().Owned())
		}
		if acting >= len(ids) {
			return time.Since(start), nil
		}
		if time.Since(start) > timeout {
			return 0, fmt.Errorf("%d of %d apps act on the survivors after %v", acting, len(ids), timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
