package worker_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/worker"
)

// Workers that list only server a end at the server the app was placed on
// (its preferred server, b), which acts; when b drains, at the new acting
// owner. With and without etcd.
func TestBreakWorkerEndsAtThePlacedOwner(t *testing.T) {
	for _, viaEtcd := range []bool{false, true} {
		t.Run(fmt.Sprintf("etcd %v", viaEtcd), func(t *testing.T) {
			e := testutil.Etcd(t, 1)
			nodes := map[string]*server.Node{}
			for _, id := range []string{"a", "b", "c"} {
				nodes[id] = startNode(t, e, id, "127.0.0.1:0")
			}
			a, b := nodes["a"], nodes["b"]
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var name string
			var app coord.AppRecord
			for i := 0; ; i++ {
				name = fmt.Sprintf("placed-%d", i)
				var err error
				app, err = a.Registry().Register(ctx, name)
				if err != nil {
					t.Fatal(err)
				}
				ws := []coord.Weighted{{ID: "a", Weight: 1}, {ID: "b", Weight: 1}, {ID: "c", Weight: 1}}
				if coord.RankWeighted(app.ID, ws)[0] == "b" {
					break
				}
			}
			w := startWorker(t, name, func(c *worker.Config) {
				c.Servers = []string{a.Addr()}
				c.Interval = 200 * time.Millisecond
				if viaEtcd {
					c.Client = testutil.Client(t, e)
				}
			})
			acting := func() *server.Node {
				for _, n := range nodes {
					if _, ok := n.Elector().Ownership(app.ID); ok {
						return n
					}
				}
				return nil
			}
			testutil.Eventually(t, 10*time.Second, "the worker to be at the acting owner b", func() bool {
				n := acting()
				return n == b && w.current() == b.Addr()
			})
			dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer dcancel()
			b.Drain(dctx)
			testutil.Eventually(t, 3*time.Second, "the worker to be at the new acting owner", func() bool {
				n := acting()
				return n != nil && n != b && w.current() == n.Addr()
			})
		})
	}
}
