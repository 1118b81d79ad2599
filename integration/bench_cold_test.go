package integration

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/testutil"
)

// BenchmarkColdStart: three servers, 10,000 registered apps with no
// owner; every app is asked for once (app i of server i%3, 16 callers per
// server, each server's ElectionConcurrency of 16 bounding its
// elections). Reports apps elected per second, etcd raft commits per app
// (etcd's own proposals-committed gauge), and the ratio of the election
// rate to the best it could be if an election cost only its commits: the
// same run's plain txn-put rate (same clients, same concurrency) divided
// by the commits per app. Run with -benchtime=1x.
func BenchmarkColdStart(b *testing.B) {
	for _, fsync := range []bool{false, true} {
		b.Run(fmt.Sprintf("fsync=%v", fsync), func(b *testing.B) {
			// With fsync a commit costs a disk flush, as in production;
			// without, every request costs about the same CPU.
			e := testutil.EtcdWith(b, etcdcluster.Config{Members: 1, FastTimings: !fsync})
			coldStart(b, e)
		})
	}
}

func coldStart(b *testing.B, e *etcdcluster.Cluster) {
	const apps = 10000
	for range b.N {
		bc := newBenchClusterOn(b, e, 3)
		ids := registerMany(b, bc, apps)
		var clients []*clientv3.Client
		for range bc.nodes {
			clients = append(clients, testutil.Client(b, bc.etcd))
		}
		putRate, putCommits := txnPutRate(b, clients, apps)
		c0 := raftCommits(b)
		start := time.Now()
		electAll(b, bc.nodes, ids)
		took := time.Since(start)
		commits := (raftCommits(b) - c0) / apps
		rate := apps / took.Seconds()
		b.ReportMetric(rate, "apps/s")
		b.ReportMetric(commits, "commits/app")
		b.ReportMetric(putRate, "txn-puts/s")
		b.ReportMetric(putCommits, "commits/put")
		b.ReportMetric(rate/(putRate/commits), "ratio")
	}
}

// txnPutRate writes n keys, each with a one-put Txn, spread over clients
// with 16 callers per client, and returns puts per second and raft
// commits per put.
func txnPutRate(b *testing.B, clients []*clientv3.Client, n int) (float64, float64) {
	work := make(chan int, n)
	for i := range n {
		work <- i
	}
	close(work)
	c0 := raftCommits(b)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range 16 * len(clients) {
		cli := clients[i%len(clients)]
		wg.Go(func() {
			for k := range work {
				key := fmt.Sprintf("/bench/txn/%d", k)
				if _, err := cli.Txn(context.Background()).Then(clientv3.OpPut(key, "x")).Commit(); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	return float64(n) / took.Seconds(), (raftCommits(b) - c0) / float64(n)
}

// raftCommits reads etcd's etcd_server_proposals_committed_total gauge
// (default registry; one embedded member).
func raftCommits(b *testing.B) float64 {
	return testutil.Metric(b, prometheus.DefaultGatherer, "etcd_server_proposals_committed_total", "")
}
