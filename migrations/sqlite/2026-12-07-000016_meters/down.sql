DROP TABLE eco_route_costs;
DROP TABLE eco_meters;
