// Package server is a scheduler server node for baton: it joins the
// cluster (a guarded etcd session and a membership key), runs the per-app
// election, and answers PowerJob's HTTP endpoints so that PowerJob-shaped
// workers can find the owner of their app.
//
// # Endpoints
//
// Every answer is PowerJob's ResultDTO, {"success":bool,"data":...,
// "message":string}. Domain errors (unknown app, no owner could be
// elected, lease unconfirmed) answer HTTP 200 with success:false, as
// PowerJob does, so a worker moves on to its next server; malformed input
// answers 400 with the same envelope.
//
//	GET      /server/assert?appName=          data: the app id (a number)
//	GET      /server/assertV2?appName=        data: {"appId","appName"}
//	GET      /server/acquire?appId=&protocol=&currentServer=
//	                                          data: the owner's address for protocol
//	GET/POST /friend/ping                     data: this server's protocol map
//	GET      /server/hello                    data: server id, owned apps and tokens, lease state, time
//	GET      /server/checkConnectivity?targetIp=&targetPort=
//	                                          data: whether this server can dial the caller back
//
// With Config.AdminToken set, requests carrying "Authorization: Bearer
// <token>" may also use POST /admin/apps?appName= (register), GET
// /admin/owners, POST /admin/handover?appId= and POST /admin/drain;
// without a token those routes do not exist (404).
//
// # Differences from PowerJob
//
//   - /server/acquire never trusts the worker's currentServer: PowerJob
//     answers "yes, it is me" without checking for a share of requests
//     (accurateSelectServerPercentage); baton answers from its ownership
//     table, which its guard keeps true, at no extra cost.
//   - An unknown protocol is an error (success:false), not a silent
//     fallback to AKKA, and a live owner is never deposed because it lacks
//     a protocol.
//   - /server/checkConnectivity dials only the requester's own IP, so the
//     server cannot be used to probe other hosts.
//   - /friend/ping answers a ResultDTO whose data is the protocol map as
//     JSON, not PowerJob's AskResponse with a byte payload: only baton
//     servers ping baton servers.
package server
