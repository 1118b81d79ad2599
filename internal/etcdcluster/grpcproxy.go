package etcdcluster

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/proxy/grpcproxy"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// GRPCProxy is etcd's gRPC proxy (the one `etcd grpc-proxy start` runs)
// serving in this process on a loopback port, in front of the cluster.
// Watchers of one key through it share one watch of etcd, and keepalives
// of one lease one stream. It can be stopped and started again on the same
// address, as a proxy process that restarts.
type GRPCProxy struct {
	cluster *Cluster
	addr    string

	mu      sync.Mutex
	running *proxyRun // nil while stopped
}

// proxyRun is one run of the proxy, from start to stop.
type proxyRun struct {
	cli    *clientv3.Client
	srv    *grpc.Server
	cancel context.CancelFunc
	done   []<-chan struct{} // the watch and lease proxies' loops
	served chan struct{}
}

// StartGRPCProxy starts a gRPC proxy in front of every member. Close the
// cluster, or the proxy, to stop it.
func (e *Cluster) StartGRPCProxy() (*GRPCProxy, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &GRPCProxy{cluster: e, addr: l.Addr().String()}
	if err := p.serve(l); err != nil {
		l.Close()
		return nil, err
	}
	e.proxiesMu.Lock()
	e.proxies = append(e.proxies, p)
	e.proxiesMu.Unlock()
	return p, nil
}

// Endpoint is the proxy's client URL.
func (p *GRPCProxy) Endpoint() string { return "http://" + p.addr }

// Stop stops the proxy as a crash would: every client stream through it
// breaks (clients retry), and nothing answers at its address until Start.
// Stop is idempotent.
func (p *GRPCProxy) Stop() {
	p.mu.Lock()
	r := p.running
	p.running = nil
	p.mu.Unlock()
	if r == nil {
		return
	}
	// The server first: clients see their streams break and retry. The
	// proxies' context after it: cancelled while still serving, it would
	// end every proxied watch for good with "context canceled".
	r.srv.Stop()
	<-r.served
	r.cancel()
	for _, done := range r.done {
		<-done
	}
	r.cli.Close()
}

// Start starts a stopped proxy again on its address.
func (p *GRPCProxy) Start() error {
	var l net.Listener
	var err error
	for range 50 { // the port was just released; another process may hold it for a moment
		if l, err = net.Listen("tcp", p.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("etcdcluster: restart the gRPC proxy on %s: %w", p.addr, err)
	}
	if err := p.serve(l); err != nil {
		l.Close()
		return err
	}
	return nil
}

func (p *GRPCProxy) serve(l net.Listener) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.running != nil {
		return fmt.Errorf("etcdcluster: the gRPC proxy on %s is running", p.addr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	cli, err := p.cluster.NewClient(ctx)
	cancel()
	if err != nil {
		return err
	}
	lg := zap.NewNop()
	pctx, pcancel := context.WithCancel(context.Background())
	kv, _ := grpcproxy.NewKvProxy(cli)
	watch, watchDone := grpcproxy.NewWatchProxy(pctx, lg, cli)
	lease, leaseDone := grpcproxy.NewLeaseProxy(pctx, cli)
	cluster, _ := grpcproxy.NewClusterProxy(lg, cli, "", "") // no advertised address: MemberList is etcd's own
	srv := grpc.NewServer()
	pb.RegisterKVServer(srv, kv)
	pb.RegisterWatchServer(srv, watch)
	pb.RegisterLeaseServer(srv, lease)
	pb.RegisterClusterServer(srv, cluster)
	pb.RegisterMaintenanceServer(srv, grpcproxy.NewMaintenanceProxy(cli))
	pb.RegisterAuthServer(srv, grpcproxy.NewAuthProxy(cli))
	r := &proxyRun{cli: cli, srv: srv, cancel: pcancel, done: []<-chan struct{}{watchDone, leaseDone}, served: make(chan struct{})}
	go func() {
		defer close(r.served)
		srv.Serve(l)
	}()
	p.running = r
	return nil
}
