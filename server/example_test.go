package server_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/coord/embedded"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/server"
)

// Embedding a node in a Go scheduler: give it your etcd client, an
// address to listen on, and callbacks that start and stop your work for
// each app it owns.
func Example() {
	etcd, _ := embedded.Start(embedded.Config{}) // your cluster in production
	defer etcd.Close()
	ctx := context.Background()
	events := make(chan string, 2)

	cfg := server.DefaultConfig()
	cfg.Client = etcd.Client()
	cfg.Listen = "127.0.0.1:0"
	cfg.Callbacks = election.Callbacks{
		OnAcquire: func(ctx context.Context, app, token int64) { events <- fmt.Sprint("scheduling app ", app) },
		OnLose:    func(app, token int64, why election.Reason) { events <- fmt.Sprint("stopped app ", app, ": ", why) },
	}
	node, err := server.NewNode(cfg)
	if err != nil {
		panic(err)
	}
	if err := node.Start(ctx); err != nil {
		panic(err)
	}

	app, _ := node.Registry().Register(ctx, "orders")
	addr, _ := node.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, "")
	fmt.Println("workers of orders talk to this node:", addr == node.Addr())
	fmt.Println(<-events)

	stop, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	node.Close(stop) // hands its apps over, revokes its lease
	fmt.Println(<-events)
	// Output:
	// workers of orders talk to this node: true
	// scheduling app 1
	// stopped app 1: resigned
}

// A scheduler that already serves HTTP mounts the node's handler on its
// own mux. The listener must exist before Start: the node advertises its
// address, and peers and workers may call it at once.
func Example_mountedOnYourMux() {
	etcd, _ := embedded.Start(embedded.Config{}) // your cluster in production
	defer etcd.Close()
	ctx := context.Background()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/jobs", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "your own API") })
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	defer srv.Close()

	cfg := server.DefaultConfig()
	cfg.Client = etcd.Client()
	cfg.Control = coord.Endpoint{Address: ln.Addr().String()}
	node, err := server.NewNode(cfg)
	if err != nil {
		panic(err)
	}
	mux.Handle("/server/", node.Handler()) // PowerJob's worker endpoints
	mux.Handle("/friend/", node.Handler()) // server-to-server pings
	if err := node.Start(ctx); err != nil {
		panic(err)
	}
	defer node.Close(ctx)
	node.Registry().Register(ctx, "orders")

	resp, err := http.Get("http://" + ln.Addr().String() + "/server/assert?appName=orders")
	if err != nil {
		panic(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.StatusCode, string(body))
	// Output: 200 {"success":true,"data":1}
}
